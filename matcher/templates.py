"""The core every layer shares: what a template is, what a traveller id is, a candidate.

Imports nothing of ours but the error types, so the store, the index and the client side
can use it without loading ONNX Runtime, FAISS or gRPC.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .errors import InvalidInput

EMBEDDING_DIM = 512          # ArcFace-family embedders: 512 floats per face
ALIGNED_SIZE = 112           # ... from a 112x112 aligned crop
# Templates are L2-normalised by the pipeline; anything far from unit norm is a caller bug
# (raw embedder output, wrong dtype reinterpretation) and would silently skew every score.
NORM_TOLERANCE = 1e-3
MAX_TRAVELLER_ID_CHARS = 128
MAX_TEMPLATES_PER_TRAVELLER = 16


def photo_sha256(data: bytes) -> str:
    """The id of a booking photo or probe (hex sha256 of its bytes): what the store, the
    audit log and the re-index cache record instead of the photo."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Candidate:
    traveller_id: str
    score: float  # best cosine similarity over the traveller's templates


def check_templates(values: object, *, what: str = "templates", allow_empty: bool = False
                    ) -> np.ndarray:
    """(k, 512) or (512,) float32, finite, unit L2 norm -> (k, 512) contiguous float32."""
    x = np.asarray(values)
    if x.dtype != np.float32:
        raise InvalidInput(f"{what} must be float32, got: dtype={x.dtype}")
    shape = x.shape
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != EMBEDDING_DIM or not (len(x) or allow_empty):
        raise InvalidInput(f"{what}: expected rows of {EMBEDDING_DIM} values, got: shape={shape}")
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} must hold only finite values (no NaN or infinity)")
    if len(x) and np.abs(np.linalg.norm(x, axis=1) - 1.0).max() > NORM_TOLERANCE:
        raise InvalidInput(f"{what} must be L2-normalised (unit length); "
                           "send the normalised embedding")
    return np.ascontiguousarray(x)


def check_traveller_id(traveller_id: object) -> str:
    if not isinstance(traveller_id, str) or not traveller_id:
        raise InvalidInput("traveller_id must be a non-empty string")
    if len(traveller_id) > MAX_TRAVELLER_ID_CHARS:
        raise InvalidInput(f"traveller_id is {len(traveller_id)} characters long; "
                           f"at most {MAX_TRAVELLER_ID_CHARS} are allowed")
    if not traveller_id.isprintable():
        raise InvalidInput("traveller_id contains non-printable characters")
    return traveller_id


def to_epoch(t: datetime | float | int, name: str) -> float:
    """A timezone-aware datetime or UTC epoch seconds -> float epoch seconds."""
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise InvalidInput(f"{name} must be timezone-aware (UTC); got a naive datetime")
        return t.timestamp()
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t)
    raise InvalidInput(f"{name} must be a timezone-aware datetime or UTC epoch seconds")


def fuse_templates(templates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Several templates of one person -> one: their (weighted) mean, L2-normalised.

    Used for a traveller's booking photos (the gallery searches one template per traveller,
    so N counts travellers) and for the frames of one probe. templates (k, 512) float32
    unit rows; weights (k,) >= 0 or None (equal). Returns (512,) float32.
    """
    x = np.asarray(templates, np.float32)
    if x.ndim != 2 or not len(x):
        raise InvalidInput("fusing needs at least one template")
    if len(x) == 1:
        return x[0].copy()
    w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (len(x),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InvalidInput("fusion weights must be finite, >= 0 and not all zero")
    fused = (w[:, None] * x).sum(axis=0)
    norm = float(np.linalg.norm(fused))
    if norm < 1e-6:  # opposite templates cancel: no direction left to match on
        raise InvalidInput("the templates cancel out; they cannot be one person's")
    return (fused / norm).astype(np.float32)


def fuse_groups(templates: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """``fuse_templates`` for many people at once: rows of ``templates`` (n, 512) belong to
    ``group`` (n,) in [0, groups) -> (groups, 512) float32; a group without rows is zeros."""
    x = np.asarray(templates, np.float32)
    g = np.asarray(group, np.int64)
    order = np.argsort(g, kind="stable")
    out = np.zeros((groups, x.shape[1] if x.ndim == 2 else EMBEDDING_DIM), np.float32)
    if not len(order):
        return out
    starts = np.flatnonzero(np.r_[True, g[order][1:] != g[order][:-1]])
    out[g[order][starts]] = np.add.reduceat(x[order], starts, axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 1e-6)
    return out
