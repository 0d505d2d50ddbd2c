"""The only module that imports compiled code: checks dtype, shape and contiguity, then dispatches.

Every function has the same signature and semantics as its numpy twin in
``matcher._reference`` (the tests' oracle). Inputs of the wrong dtype, shape or memory
layout raise ``ValueError``; nothing is silently cast or copied, so a caller never pays
for a hidden conversion and never gets a result computed on something else.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import numpy as np

UINT8, FLOAT32, FLOAT64 = np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64)

try:
    from . import _imaging, _scrfd
except ImportError as exc:  # pragma: no cover - only on a checkout that was never built
    raise ImportError(
        "matcher's native kernels (matcher._imaging, matcher._scrfd) are not built; "
        "run `pip install -e .` in the repository (needs a C compiler and Cython)"
    ) from exc


def _check(x: object, name: str, dtype: np.dtype, shape: tuple[int | None, ...], *,
           writable: bool = False) -> np.ndarray:
    """``x`` as-is if it is a C-contiguous ndarray of ``dtype`` matching ``shape`` (None = any)."""
    # Written for speed: decode_scrfd checks nine arrays per image.
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got: type={type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype.name}, got: {name}.dtype={x.dtype}")
    got = x.shape
    if len(got) != len(shape):
        _bad_shape(name, got, shape)
    # Lengths checked just above; any keyword to zip() costs about a tenth of a small
    # kernel call, and this runs on every one.
    for have, want in zip(got, shape):  # noqa: B905
        if want is not None and have != want:
            _bad_shape(name, got, shape)
    flags = x.flags
    if not flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got: {name}.strides={x.strides}")
    if writable and not flags.writeable:
        raise ValueError(f"{name} must be writable, got: a read-only array")
    return x


def _bad_shape(name: str, got: tuple[int, ...], shape: tuple[int | None, ...]) -> NoReturn:
    expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    raise ValueError(f"{name} must have shape {expected}, got: {name}.shape={got}")


def _check_image(image: object) -> np.ndarray:
    image = _check(image, "image", UINT8, (None, None, 3))
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have at least one pixel, got: image.shape={image.shape}")
    return image


def letterbox_to_blob(image: np.ndarray, out: np.ndarray, new_h: int, new_w: int,
                      mean: float, inv_std: float) -> None:
    """Bilinear-resize ``image`` into the top-left ``new_h x new_w`` of ``out``, normalised.

    image: (H, W, 3) uint8 RGB, C-contiguous.
    out:   (3, OH, OW) float32, C-contiguous, written in place; (v - mean) * inv_std in
           RGB planes, padding right/below holds (0 - mean) * inv_std.
    Same result as ``_reference.letterbox_to_blob`` (cv2.resize INTER_LINEAR centres).
    """
    image = _check_image(image)
    out = _check(out, "out", FLOAT32, (3, None, None), writable=True)
    new_h, new_w = int(new_h), int(new_w)
    if not (1 <= new_h <= out.shape[1] and 1 <= new_w <= out.shape[2]):
        raise ValueError(f"resized size must fit in out, got: new_h={new_h}, new_w={new_w}, "
                         f"out.shape={out.shape}")
    _imaging.letterbox_to_blob(image, out, new_h, new_w, float(mean), float(inv_std))


def warp_faces_to_batch(image: np.ndarray, inverse_transforms: np.ndarray, out: np.ndarray,
                        mean: float, inv_std: float) -> None:
    """Warp one crop per face into a batch tensor, normalised, CHW.

    image:              (H, W, 3) uint8 RGB, C-contiguous.
    inverse_transforms: (n, 2, 3) float64, finite; maps an output pixel (x, y, 1) to the
                        source pixel (sx, sy).
    out:                (n, 3, S, S') float32, C-contiguous, written in place.
    Bilinear; source pixels outside the image count as 0 (cv2 BORDER_CONSTANT). Runs on
    one core with the GIL released.
    """
    image = _check_image(image)
    inverse_transforms = _check(inverse_transforms, "inverse_transforms", FLOAT64,
                                (None, 2, 3))
    out = _check(out, "out", FLOAT32, (len(inverse_transforms), 3, None, None),
                 writable=True)
    if not np.isfinite(inverse_transforms).all():
        # NaN/inf would make the source pixel undefined (the twin returns garbage for it)
        raise ValueError("inverse_transforms must be finite, got: NaN or inf in a transform")
    _imaging.warp_faces_to_batch(image, inverse_transforms, out, float(mean), float(inv_std))


def decode_scrfd(scores: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                 kps: Sequence[np.ndarray], strides: tuple[int, ...], input_w: int,
                 num_anchors: int, threshold: float,
                 det_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn SCRFD's per-stride outputs for one image into candidate faces.

    scores[i]: (N_i,) float32, boxes[i]: (N_i, 4) float32, kps[i]: (N_i, 10) float32, all
    C-contiguous, for stride ``strides[i]``; N_i must be a whole number of grid rows
    (a multiple of ``num_anchors * (input_w // stride)``). Returns (m,) float32 scores,
    (m, 4) float32 x1y1x2y2 and (m, 5, 2) float32 keypoints in original-image pixels,
    in stride then anchor order (unsorted), exactly as ``_reference.decode_scrfd``.
    """
    strides = tuple(int(s) for s in strides)
    if not strides or not len(scores) == len(boxes) == len(kps) == len(strides):
        raise ValueError(f"need one scores, boxes and kps array per stride, got: "
                         f"{len(scores)}, {len(boxes)}, {len(kps)} arrays for strides {strides}")
    if num_anchors < 1 or any(s < 1 or input_w < s for s in strides):
        raise ValueError(f"bad anchor layout, got: num_anchors={num_anchors}, "
                         f"strides={strides}, input_w={input_w}")
    if not det_scale > 0:
        raise ValueError(f"det_scale must be positive, got: det_scale={det_scale}")
    for i, stride in enumerate(strides):
        s = _check(scores[i], f"scores[{i}]", FLOAT32, (None,))
        _check(boxes[i], f"boxes[{i}]", FLOAT32, (len(s), 4))
        _check(kps[i], f"kps[{i}]", FLOAT32, (len(s), 10))
        row = num_anchors * (input_w // stride)
        if len(s) % row:
            raise ValueError(f"scores[{i}] is not a whole anchor grid for stride {stride}, "
                             f"got: {len(s)} anchors, rows of {row}")
    # the twin multiplies by np.float32(1 / det_scale): same rounding here
    return _scrfd.decode_candidates(tuple(scores), tuple(boxes), tuple(kps), strides,
                                    int(input_w), int(num_anchors), threshold, 1.0 / det_scale,
                                    _candidate_arrays)


def _candidate_arrays(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outputs of decode_scrfd for m candidates: scores, boxes, keypoints."""
    return (np.empty(m, dtype=np.float32), np.empty((m, 4), dtype=np.float32),
            np.empty((m, 5, 2), dtype=np.float32))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices (int64), highest score first.

    boxes: (m, 4) float32 x1y1x2y2, scores: (m,) float32, both C-contiguous. Equal scores
    keep index order (stable), and the +1 pixel area convention of the reference SCRFD
    code is used, as in ``_reference.nms``.
    """
    scores = _check(scores, "scores", FLOAT32, (None,))
    boxes = _check(boxes, "boxes", FLOAT32, (len(scores), 4))
    keep = np.empty(len(scores), dtype=np.int64)
    kept = _scrfd.nms(boxes, scores, iou_threshold, keep)
    return keep[:kept]
