"""Synthetic templates, galleries and fixed times shared by the store, index, gallery and
snapshot tests."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matcher.gallery.primary import PrimaryGallery

MODEL = "test-model@000000000000"
NOW = 1_800_000_000.0
WINDOW = (NOW - 60, NOW + 3600)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def templates(n: int, seed: int = 0) -> np.ndarray:
    """(n, 512) float32 random templates, L2-normalised; the same for the same seed."""
    return unit(np.random.default_rng(seed).standard_normal((n, 512)))


def sha(i: object) -> str:
    """A stand-in photo sha256 derived from ``i``."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def enrol_each(gallery: PrimaryGallery, x: np.ndarray,
               windows: Sequence[tuple[float, float]] | None = None) -> list[str]:
    """Enrol traveller ``T{i}`` with template ``x[i]`` from photo ``sha(i)``, booked for
    ``windows[i]`` (every one for WINDOW by default); returns the traveller ids."""
    ids = []
    for i, template in enumerate(x):
        valid_from, valid_to = WINDOW if windows is None else windows[i]
        gallery.enroll(f"T{i}", template, valid_from, valid_to, [sha(i)])
        ids.append(f"T{i}")
    return ids
