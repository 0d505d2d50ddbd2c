"""Parity of every native kernel with its numpy twin, input checks, and the whole pipeline.

The twins in ``matcher._reference`` are the oracle. The kernels keep the twins' float32
operation order, so the tolerances below are tight (a few ulp of the normalised value);
NMS is compared as int64 index lists, exactly: both break score ties by index.
"""
from __future__ import annotations

import importlib
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from matcher import _native, _reference
from matcher.face.alignment import alignment_transforms
from matcher.face.pipeline import (
    ANCHORS_PER_CELL,
    DET_INV_STD,
    DET_MEAN,
    EMB_INV_STD,
    EMB_MEAN,
    STRIDES,
    DetectorConfig,
    largest_face,
    letterbox_geometry,
)

# Per output dtype: the kernels and twins round identically in practice; the slack covers
# a compiler that evaluates float32 expressions in a different order.
TOLERANCE = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5)}
REAL_IMAGES = ("obama_1080p.jpg", "obama_small.jpg", "biden_1.jpg", "obama_partial_face_1.jpg",
               "group_obama_biden.jpg", "obama_240p.jpg")


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert_allclose(actual, expected, **TOLERANCE[actual.dtype])


def assert_same_indices(actual: np.ndarray, expected: np.ndarray) -> None:
    """Kept NMS indices agree exactly: int64, same indices, same order (both break score
    ties by index, so a tie-tolerant comparison would only be weaker)."""
    assert actual.dtype == expected.dtype == np.int64
    assert_array_equal(actual, expected)


@pytest.fixture(scope="module")
def images(pipeline, faces_dir: Path) -> dict[str, np.ndarray]:
    return {name: pipeline.decode((faces_dir / name).read_bytes()) for name in REAL_IMAGES}


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- letterbox ---------------------------------------------------------------------------

def run_letterbox(fn, image: np.ndarray, out_shape: tuple[int, int], new_h: int, new_w: int,
                  mean: float = DET_MEAN, inv_std: float = DET_INV_STD) -> np.ndarray:
    out = np.full((3, *out_shape), np.nan, dtype=np.float32)  # NaN shows unwritten pixels
    fn(image, out, new_h, new_w, mean, inv_std)
    return out


@pytest.mark.parametrize("name", REAL_IMAGES)
@pytest.mark.parametrize("config", [DetectorConfig(), DetectorConfig(input_size=(640, 640))],
                         ids=["adaptive", "640x640"])
def test_letterbox_matches_twin_on_real_images(images, name, config):
    image = images[name]
    input_h, input_w, new_h, new_w, _ = letterbox_geometry(*image.shape[:2], config)
    native = run_letterbox(_native.letterbox_to_blob, image, (input_h, input_w), new_h, new_w)
    twin = run_letterbox(_reference.letterbox_to_blob, image, (input_h, input_w), new_h, new_w)
    assert not np.isnan(native).any()
    assert_close(native, twin)


@pytest.mark.parametrize("src, dst, out", [
    ((1, 1), (1, 1), (1, 1)),        # one pixel
    ((1, 1), (5, 3), (8, 8)),        # one pixel blown up, padded
    ((1, 9), (4, 20), (4, 32)),      # one row
    ((7, 1), (3, 1), (5, 2)),        # one column, downscale
    ((5, 7), (33, 17), (40, 32)),    # odd upscale, different per axis
    ((1080, 1920), (360, 640), (384, 640)),   # lane frame down to the detector size
    ((481, 643), (479, 641), (480, 672)),     # almost identity, odd sizes
    ((240, 320), (480, 640), (480, 640)),     # 2x upscale
])
def test_letterbox_matches_twin_on_random_images(src, dst, out):
    rng = np.random.default_rng(sum(src) + sum(dst))
    image = random_image(rng, *src)
    native = run_letterbox(_native.letterbox_to_blob, image, out, *dst, EMB_MEAN, EMB_INV_STD)
    twin = run_letterbox(_reference.letterbox_to_blob, image, out, *dst, EMB_MEAN, EMB_INV_STD)
    assert_close(native, twin)


@settings(max_examples=60, deadline=None)
@given(src_h=st.integers(1, 40), src_w=st.integers(1, 40), new_h=st.integers(1, 40),
       new_w=st.integers(1, 40), pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_letterbox_matches_twin_for_any_size(src_h, src_w, new_h, new_w, pad, seed):
    image = random_image(np.random.default_rng(seed), src_h, src_w)
    out = (new_h + pad, new_w + 2 * pad)
    assert_close(run_letterbox(_native.letterbox_to_blob, image, out, new_h, new_w),
                 run_letterbox(_reference.letterbox_to_blob, image, out, new_h, new_w))


def test_letterbox_pads_with_normalised_black():
    image = np.full((10, 10, 3), 255, dtype=np.uint8)
    out = run_letterbox(_native.letterbox_to_blob, image, (12, 16), 10, 10)
    assert_allclose(out[:, :10, :10], (255 - DET_MEAN) * DET_INV_STD)
    assert_allclose(out[:, 10:, :], -DET_MEAN * DET_INV_STD)
    assert_allclose(out[:, :, 10:], -DET_MEAN * DET_INV_STD)


def test_letterbox_accepts_read_only_image():
    image = random_image(np.random.default_rng(3), 20, 30)
    image.flags.writeable = False
    native = run_letterbox(_native.letterbox_to_blob, image, (16, 32), 10, 15)
    assert_close(native, run_letterbox(_reference.letterbox_to_blob, image, (16, 32), 10, 15))


# -- affine warp -------------------------------------------------------------------------

def run_warp(fn, image: np.ndarray, transforms: np.ndarray, size=(112, 112)) -> np.ndarray:
    out = np.full((len(transforms), 3, *size), np.nan, dtype=np.float32)
    fn(image, transforms, out, EMB_MEAN, EMB_INV_STD)
    return out


def random_transforms(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Crop -> image maps: any rotation, scale 0.1-8, centred anywhere in or near the image."""
    angle = rng.uniform(-np.pi, np.pi, n)
    scale = np.exp(rng.uniform(np.log(0.1), np.log(8.0), n))
    shear = rng.uniform(-0.2, 0.2, n)
    m = np.empty((n, 2, 3))
    m[:, 0, 0] = scale * np.cos(angle)
    m[:, 0, 1] = -scale * np.sin(angle) + shear
    m[:, 1, 0] = scale * np.sin(angle)
    m[:, 1, 1] = scale * np.cos(angle)
    centre_x = rng.uniform(-0.5 * w, 1.5 * w, n)   # often partly or wholly outside
    centre_y = rng.uniform(-0.5 * h, 1.5 * h, n)
    m[:, 0, 2] = centre_x - (m[:, 0, 0] + m[:, 0, 1]) * 56
    m[:, 1, 2] = centre_y - (m[:, 1, 0] + m[:, 1, 1]) * 56
    return m


def test_warp_matches_twin_on_real_faces(pipeline, images):
    for name, image in images.items():
        detections = pipeline.detect(image)
        assert len(detections), name
        transforms = alignment_transforms(detections.kps)
        assert_close(run_warp(_native.warp_faces_to_batch, image, transforms),
                     run_warp(_reference.warp_faces_to_batch, image, transforms))


@pytest.mark.parametrize("h, w, n, size", [
    (1080, 1920, 16, (112, 112)),
    (480, 640, 1, (112, 112)),
    (1, 1, 3, (112, 112)),        # one-pixel image
    (2, 3, 5, (7, 9)),            # tiny image, odd non-square crop
    (37, 11, 9, (1, 1)),          # one-pixel crop
])
def test_warp_matches_twin_on_random_transforms(h, w, n, size):
    rng = np.random.default_rng(h * w + n)
    image = random_image(rng, h, w)
    transforms = random_transforms(rng, n, h, w)
    native = run_warp(_native.warp_faces_to_batch, image, transforms, size)
    assert not np.isnan(native).any()
    assert_close(native, run_warp(_reference.warp_faces_to_batch, image, transforms, size))


def test_warp_edges_and_outside():
    """Identity at the border, half a pixel outside, and a crop entirely off the image."""
    rng = np.random.default_rng(5)
    image = random_image(rng, 50, 60)
    shifts = [(0, 0), (-0.5, -0.5), (59.5 - 111, 49.5 - 111), (-1.0, -1.0), (1000, -1000)]
    transforms = np.array([[[1, 0, dx], [0, 1, dy]] for dx, dy in shifts], dtype=np.float64)
    native = run_warp(_native.warp_faces_to_batch, image, transforms)
    assert_close(native, run_warp(_reference.warp_faces_to_batch, image, transforms))
    assert_allclose(native[0, :, :50, :60],
                    (image.transpose(2, 0, 1) - EMB_MEAN) * EMB_INV_STD, rtol=1e-6)
    assert_allclose(native[4], -EMB_MEAN * EMB_INV_STD)


def test_warp_no_faces_leaves_empty_batch():
    """No faces is a valid call with an empty batch, as in the twin; a batch of another
    length is refused before anything is written."""
    image = random_image(np.random.default_rng(0), 4, 4)
    no_faces = np.empty((0, 2, 3))
    for warp in (_native.warp_faces_to_batch, _reference.warp_faces_to_batch):
        out = np.empty((0, 3, 112, 112), dtype=np.float32)
        assert warp(image, no_faces, out, EMB_MEAN, EMB_INV_STD) is None
        assert out.shape == (0, 3, 112, 112)
    one = np.full((1, 3, 112, 112), 7.0, np.float32)
    with pytest.raises(ValueError, match="out"):
        _native.warp_faces_to_batch(image, no_faces, one, EMB_MEAN, EMB_INV_STD)
    assert (one == 7.0).all()


# -- SCRFD decode ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector_outputs(pipeline, images):
    """Raw SCRFD outputs for real images: [(scores, boxes, kps, input_w, det_scale)]."""
    runs = []
    for name in ("group_obama_biden.jpg", "obama_1080p.jpg", "obama_small.jpg"):
        image = images[name]
        input_h, input_w, new_h, new_w, det_scale = letterbox_geometry(
            *image.shape[:2], pipeline.detector_config)
        blob = np.empty((1, 3, input_h, input_w), dtype=np.float32)
        _native.letterbox_to_blob(image, blob[0], new_h, new_w, DET_MEAN, DET_INV_STD)
        outs = pipeline.sessions.detector.run(None, {pipeline.sessions.detector_input: blob})
        n = len(STRIDES)
        runs.append(([np.ascontiguousarray(outs[i][0, :, 0]) for i in range(n)],
                     [np.ascontiguousarray(outs[n + i][0]) for i in range(n)],
                     [np.ascontiguousarray(outs[2 * n + i][0]) for i in range(n)],
                     input_w, det_scale))
    return runs


def decode_both(scores, boxes, kps, input_w, threshold, det_scale, num_anchors=ANCHORS_PER_CELL):
    args = (scores, boxes, kps, STRIDES, input_w, num_anchors, threshold, det_scale)
    return _native.decode_scrfd(*args), _reference.decode_scrfd(*args)


@pytest.mark.parametrize("threshold", [0.5, 0.02, 0.7, 1.5])
def test_decode_matches_twin_on_real_detector_outputs(detector_outputs, threshold):
    # 0.7 is not a float32: both must compare in float32 the same way; 1.5 keeps nothing.
    for scores, boxes, kps, input_w, det_scale in detector_outputs:
        native, twin = decode_both(scores, boxes, kps, input_w, threshold, det_scale)
        for a, b in zip(native, twin, strict=True):
            assert a.shape == b.shape
            assert_close(a, b)
        if threshold < 1:
            assert len(native[0]) > 0


def test_decode_matches_twin_on_random_outputs():
    rng = np.random.default_rng(11)
    input_w, input_h = 96, 64
    grids = [(input_h // s) * (input_w // s) * 3 for s in STRIDES]
    scores = [rng.random(n, dtype=np.float32) for n in grids]
    scores[1][::7] = np.float32(0.7)        # exactly at a threshold that is not a float32
    boxes = [rng.random((n, 4), dtype=np.float32) * 5 for n in grids]
    kps = [rng.normal(size=(n, 10)).astype(np.float32) for n in grids]
    native, twin = decode_both(scores, boxes, kps, input_w, 0.7, 0.37, num_anchors=3)
    for a, b in zip(native, twin, strict=True):
        assert_close(a, b)


# -- NMS ---------------------------------------------------------------------------------

def random_boxes(rng: np.random.Generator, m: int, distinct_scores: int | None = None):
    xy = rng.uniform(0, 200, (m, 2))
    wh = rng.uniform(1, 60, (m, 2))
    boxes = np.hstack([xy, xy + wh]).astype(np.float32)
    scores = rng.random(m, dtype=np.float32)
    if distinct_scores is not None:  # many exact ties
        scores = (np.floor(scores * distinct_scores) / distinct_scores).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("m, distinct", [(0, None), (1, None), (2, 1), (50, None), (400, None),
                                         (400, 4), (1000, 20)])
@pytest.mark.parametrize("iou", [0.0, 0.4, 0.7, 1.0])
def test_nms_matches_twin(m, distinct, iou):
    rng = np.random.default_rng(m + 7 * (distinct or 0))
    boxes, scores = random_boxes(rng, m, distinct)
    assert_same_indices(_native.nms(boxes, scores, iou), _reference.nms(boxes, scores, iou))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 60), distinct=st.integers(1, 5), iou=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_nms_matches_twin_with_heavy_ties(m, distinct, iou, seed):
    boxes, scores = random_boxes(np.random.default_rng(seed), m, distinct)
    boxes[::3] = boxes[0] if m else boxes[::3]  # identical boxes too
    assert_same_indices(_native.nms(boxes, scores, iou), _reference.nms(boxes, scores, iou))


def test_nms_ties_keep_index_order():
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 0, 210, 10],
                      [1, 1, 11, 11]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.5, 0.9], dtype=np.float32)
    # 3 overlaps 0 but outranks it; 1 and 3 tie, index order breaks it.
    assert_array_equal(_native.nms(boxes, scores, 0.4), [1, 3, 2])


def test_nms_matches_twin_on_real_candidates(detector_outputs):
    for scores, boxes, kps, input_w, det_scale in detector_outputs:
        s, b, _ = _native.decode_scrfd(scores, boxes, kps, STRIDES, input_w, ANCHORS_PER_CELL,
                                       0.02, det_scale)
        assert_same_indices(_native.nms(b, s, 0.4), _reference.nms(b, s, 0.4))


# -- input checks ------------------------------------------------------------------------

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)
BLOB = np.zeros((3, 8, 8), dtype=np.float32)
T = np.tile(np.array([[1.0, 0, 0], [0, 1, 0]]), (2, 1, 1))
BATCH = np.zeros((2, 3, 112, 112), dtype=np.float32)
BOXES = np.zeros((3, 4), dtype=np.float32)
SCORES = np.zeros(3, dtype=np.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: _native.letterbox_to_blob(IMAGE.astype(np.float32), BLOB, 8, 8, 0, 1),
     "image.dtype=float32"),
    (lambda: _native.letterbox_to_blob(IMAGE[:, ::2], BLOB, 8, 8, 0, 1), "C-contiguous"),
    (lambda: _native.letterbox_to_blob(IMAGE[..., :1].copy(), BLOB, 8, 8, 0, 1),
     "image.shape=(8, 8, 1)"),
    (lambda: _native.letterbox_to_blob(IMAGE[:0], BLOB, 8, 8, 0, 1), "at least one pixel"),
    (lambda: _native.letterbox_to_blob(IMAGE, BLOB.astype(np.float64), 8, 8, 0, 1),
     "out.dtype=float64"),
    (lambda: _native.letterbox_to_blob(IMAGE, np.zeros((3, 8, 16), np.float32)[:, :, ::2],
                                       8, 8, 0, 1), "out must be C-contiguous"),
    (lambda: _native.letterbox_to_blob(IMAGE, BLOB, 9, 8, 0, 1), "must fit in out"),
    (lambda: _native.letterbox_to_blob(IMAGE, BLOB, 0, 8, 0, 1), "must fit in out"),
    (lambda: _native.letterbox_to_blob(IMAGE.tolist(), BLOB, 8, 8, 0, 1), "type=list"),
    (lambda: _native.warp_faces_to_batch(IMAGE, T.astype(np.float32), BATCH, 0, 1),
     "inverse_transforms.dtype=float32"),
    (lambda: _native.warp_faces_to_batch(IMAGE, T[:1], BATCH, 0, 1), "out.shape=(2, 3, 112"),
    (lambda: _native.warp_faces_to_batch(IMAGE, T.transpose(0, 1, 2)[:, :, ::-1], BATCH, 0, 1),
     "C-contiguous"),
    (lambda: _native.warp_faces_to_batch(IMAGE, T * np.nan, BATCH, 0, 1), "finite"),
    (lambda: _native.warp_faces_to_batch(IMAGE.astype(np.int16), T, BATCH, 0, 1),
     "image.dtype=int16"),
    (lambda: _native.nms(BOXES.astype(np.float64), SCORES, 0.4), "boxes.dtype=float64"),
    (lambda: _native.nms(BOXES, SCORES.astype(np.float16), 0.4), "scores.dtype=float16"),
    (lambda: _native.nms(BOXES[:2], SCORES, 0.4), "boxes.shape=(2, 4)"),
    (lambda: _native.nms(np.asfortranarray(np.zeros((3, 4), np.float32)), SCORES, 0.4),
     "C-contiguous"),
    (lambda: _native.decode_scrfd([SCORES.astype(np.float64)] * 3, [BOXES] * 3,
                                  [np.zeros((3, 10), np.float32)] * 3, STRIDES, 32, 1, 0.5, 1.0),
     "scores[0].dtype=float64"),
    (lambda: _native.decode_scrfd([SCORES] * 2, [BOXES] * 3, [BOXES] * 3, STRIDES, 32, 1, 0.5,
                                  1.0), "one scores, boxes and kps array per stride"),
    (lambda: _native.decode_scrfd([SCORES] * 3, [BOXES] * 3, [BOXES] * 3, STRIDES, 32, 1, 0.5,
                                  1.0), "kps[0].shape=(3, 4)"),
    (lambda: _native.decode_scrfd([SCORES] * 3, [BOXES] * 3, [np.zeros((3, 10), np.float32)] * 3,
                                  STRIDES, 64, 1, 0.5, 1.0), "not a whole anchor grid"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_read_only_out_is_refused():
    blob = BLOB.copy()
    blob.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _native.letterbox_to_blob(IMAGE, blob, 8, 8, 0, 1)


def test_missing_extension_tells_user_to_build(monkeypatch):
    import matcher

    monkeypatch.setitem(sys.modules, "matcher._imaging", None)  # as if never built
    monkeypatch.delattr(matcher, "_imaging")
    monkeypatch.delitem(sys.modules, "matcher._native")  # restored afterwards
    with pytest.raises(ImportError, match=r"run `pip install -e \.`"):
        importlib.import_module("matcher._native")


# -- whole pipeline ----------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_with_native_kernels_separates_people(pipeline, faces_dir, face_labels,
                                                       single_face_files):
    from matcher.face import pipeline as pipeline_module

    assert pipeline_module._native is _native
    templates = {}
    for name in single_face_files:
        faces = pipeline.analyse(pipeline.decode((faces_dir / name).read_bytes()))
        assert len(faces) == 1, name
        templates[name] = largest_face(faces).template
    same, different = [], []
    for a, b in itertools.combinations(single_face_files, 2):
        similarity = float(templates[a] @ templates[b])
        same_person = face_labels[a]["identity"] == face_labels[b]["identity"]
        (same if same_person else different).append((similarity, a, b))
    assert len(same) > 40 and len(different) > 100
    assert min(same)[0] >= 0.50, min(same)
    assert max(different)[0] <= 0.20, max(different)
