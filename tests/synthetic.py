"""Synthetic templates and fixed times shared by the store, index, gallery and snapshot tests."""
from __future__ import annotations

import hashlib

import numpy as np

MODEL = "test-model@000000000000"
NOW = 1_800_000_000.0
WINDOW = (NOW - 60, NOW + 3600)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def sha(i: object) -> str:
    """A stand-in photo sha256 derived from ``i``."""
    return hashlib.sha256(str(i).encode()).hexdigest()
