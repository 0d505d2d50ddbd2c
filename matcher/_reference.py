"""Pure-numpy twins of every native kernel: the tests' oracle and the benchmarks' baseline.

Each function here has the same signature and semantics as its namesake in
``matcher._native``. They follow OpenCV's conventions (which the reference InsightFace
pipeline uses) so that templates agree with it: ``cv2.resize`` half-pixel centres for the
detector letterbox, ``cv2.warpAffine`` integer pixel centres and a zero border for the
aligned crop.
"""
from __future__ import annotations

import numpy as np


def letterbox_to_blob(image: np.ndarray, out: np.ndarray, new_h: int, new_w: int,
                      mean: float, inv_std: float) -> None:
    """Bilinear-resize ``image`` into the top-left ``new_h x new_w`` of ``out``, normalised.

    image: (H, W, 3) uint8 RGB, C-contiguous.
    out:   (3, OH, OW) float32, written in place; (v - mean) * inv_std, RGB planes.
           The padding right/below the resized image holds (0 - mean) * inv_std, as if
           the letterbox were black pixels (what SCRFD was trained and evaluated on).
    """
    src_h, src_w = image.shape[:2]
    out[...] = (0.0 - mean) * inv_std
    y0, y1, wy = _linear_taps(src_h, new_h)
    x0, x1, wx = _linear_taps(src_w, new_w)
    img = image.astype(np.float32)
    top = img[y0] * (1.0 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    rows = top[:, x0] * (1.0 - wx)[None, :, None] + top[:, x1] * wx[None, :, None]
    out[:, :new_h, :new_w] = ((rows - mean) * inv_std).transpose(2, 0, 1)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of cv2.resize INTER_LINEAR along one axis."""
    scale = src / dst
    f = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.int64)
    w = (f - i0).astype(np.float32)
    w[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, w


def warp_faces_to_batch(image: np.ndarray, inverse_transforms: np.ndarray, out: np.ndarray,
                        mean: float, inv_std: float) -> None:
    """Warp one crop per face into a batch tensor, normalised, CHW.

    image:              (H, W, 3) uint8 RGB.
    inverse_transforms: (n, 2, 3) float64, maps an output pixel (x, y, 1) to source (sx, sy).
    out:                (n, 3, S, S) float32, written in place.
    Bilinear sampling; source pixels outside the image count as 0 (cv2 BORDER_CONSTANT).
    """
    n, _, size_h, size_w = out.shape
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:size_h, 0:size_w].astype(np.float64)
    padded = np.zeros((h + 2, w + 2, 3), dtype=np.float32)
    padded[1:-1, 1:-1] = image
    for i in range(n):
        m = inverse_transforms[i]
        sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        x0 = np.floor(sx)
        y0 = np.floor(sy)
        fx = (sx - x0).astype(np.float32)[..., None]
        fy = (sy - y0).astype(np.float32)[..., None]
        # +1 shifts into the zero-padded frame; anything further out samples the border.
        x0i = np.clip(x0.astype(np.int64) + 1, 0, w + 1)
        y0i = np.clip(y0.astype(np.int64) + 1, 0, h + 1)
        x1i = np.clip(x0.astype(np.int64) + 2, 0, w + 1)
        y1i = np.clip(y0.astype(np.int64) + 2, 0, h + 1)
        far = (sx < -1) | (sy < -1) | (sx >= w) | (sy >= h)
        v = (padded[y0i, x0i] * (1 - fx) * (1 - fy) + padded[y0i, x1i] * fx * (1 - fy)
             + padded[y1i, x0i] * (1 - fx) * fy + padded[y1i, x1i] * fx * fy)
        v[far] = 0.0
        out[i] = ((v - mean) * inv_std).transpose(2, 0, 1)


def decode_scrfd(scores: list[np.ndarray], boxes: list[np.ndarray], kps: list[np.ndarray],
                 strides: tuple[int, ...], input_w: int, num_anchors: int, threshold: float,
                 det_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn SCRFD's per-stride outputs for one image into candidate faces.

    scores[i]: (N_i,) float32, boxes[i]: (N_i, 4) float32 distances in stride units,
    kps[i]: (N_i, 10) float32 offsets in stride units, for stride ``strides[i]``;
    anchors run row-major over the (input_h/stride, input_w/stride) grid, ``num_anchors``
    consecutive anchors per cell. Returns (m,) scores, (m, 4) x1y1x2y2 and (m, 5, 2)
    keypoints in original-image pixels (divided by ``det_scale``), unsorted.
    """
    out_s, out_b, out_k = [], [], []
    # strict: unequal lengths raise, as the native kernel's dispatcher does
    for s, b, k, stride in zip(scores, boxes, kps, strides, strict=True):
        keep = np.nonzero(s >= threshold)[0]
        cells = keep // num_anchors
        width = input_w // stride
        cx = ((cells % width) * stride).astype(np.float32)[:, None]
        cy = ((cells // width) * stride).astype(np.float32)[:, None]
        d = b[keep] * stride
        out_b.append(np.hstack([cx - d[:, 0:1], cy - d[:, 1:2], cx + d[:, 2:3], cy + d[:, 3:4]]))
        p = k[keep] * stride
        out_k.append(np.stack([cx + p[:, 0::2], cy + p[:, 1::2]], axis=-1))
        out_s.append(s[keep])
    inv = np.float32(1.0 / det_scale)
    return (np.concatenate(out_s).astype(np.float32),
            (np.concatenate(out_b) * inv).astype(np.float32),
            (np.concatenate(out_k) * inv).astype(np.float32))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    boxes: (m, 4) float32 x1y1x2y2; scores: (m,) float32. Uses the +1 pixel area
    convention of the reference SCRFD code so the same boxes survive.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
