"""5-point similarity alignment to the ArcFace 112x112 template."""
from __future__ import annotations

import numpy as np

# Where ArcFace-family embedders expect the eyes, nose tip and mouth corners (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst.

    Umeyama (1991), reflection excluded; the same estimate as scikit-image's
    ``SimilarityTransform`` that the reference pipeline uses. src, dst: (k, 2).
    Returns the (2, 3) float64 forward matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c ** 2).sum() / len(src)
    scale = (s * d).sum() / src_var if src_var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rotation
    m[:, 2] = dst_mean - scale * rotation @ src_mean
    return m


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, as a (2, 3) matrix."""
    a = m[:, :2]
    inv = np.linalg.inv(a)
    return np.hstack([inv, -inv @ m[:, 2:3]])


def alignment_transforms(kps: np.ndarray) -> np.ndarray:
    """(n, 5, 2) landmarks -> (n, 2, 3) inverse transforms (crop pixel -> image pixel)."""
    return np.stack([invert_affine(similarity_transform(k)) for k in kps]) if len(kps) else \
        np.empty((0, 2, 3))
