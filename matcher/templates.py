"""The core every layer shares: what a template is, what a traveller id is, a candidate.

Imports nothing of ours but the error types, so the store, the index and the client side
can use it without loading ONNX Runtime, FAISS or gRPC.
"""
from __future__ import annotations

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
