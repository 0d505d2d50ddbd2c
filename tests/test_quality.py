"""Per-face quality: good shared captures pass; blurred, tiny, turned and odd faces are
rejected with the reason a lane can turn into a prompt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from matcher.face.alignment import ARCFACE_TEMPLATE
from matcher.face.pipeline import Pipeline, largest_face
from matcher.face.quality import (
    DEFAULT_POLICY,
    QualityPolicy,
    assess,
    laplacian_variance,
    pose_from_landmarks,
)

# In the ArcFace template the eyes are ~35 px apart in the 112x112 crop: a blur of
# ``k * inter_eye / 35`` image pixels is a blur of k pixels on the crop the embedder sees.
CROP_INTER_EYE = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))
PROBES = ("obama_4.jpg", "biden_2.jpg", "kit_harington_1.jpg", "rose_leslie_2.jpg")


def _image(pipeline: Pipeline, faces_dir: Path, name: str) -> Image.Image:
    return Image.fromarray(pipeline.decode((faces_dir / name).read_bytes()))


def test_good_single_face_photos_are_accepted(pipeline: Pipeline, faces_dir: Path,
                                              single_face_files) -> None:
    rejected = {}
    for f in single_face_files:
        (face,) = pipeline.analyse_bytes((faces_dir / f).read_bytes())
        q = face.quality
        assert q.det_score == face.det_score and q.inter_eye_px > 0 and q.sharpness > 0
        if not q.accepted:
            rejected[f] = q.reasons
    assert not rejected, f"good captures rejected: {rejected}"


@pytest.mark.parametrize("name", PROBES)
def test_blurred_copy_is_rejected_as_blurred(pipeline: Pipeline, faces_dir: Path,
                                             name: str) -> None:
    image = _image(pipeline, faces_dir, name)
    sharp = largest_face(pipeline.analyse(np.asarray(image)))
    assert sharp.quality.accepted
    radius = 3.0 * sharp.quality.inter_eye_px / CROP_INTER_EYE
    soft = image.filter(ImageFilter.GaussianBlur(radius))
    blurred = largest_face(pipeline.analyse(np.asarray(soft)))
    assert blurred is not None, "the blurred face should still be detected"
    assert "blurred" in blurred.quality.reasons
    assert "face_too_small" not in blurred.quality.reasons  # same size, only softer
    assert blurred.quality.sharpness < sharp.quality.sharpness / 10


@pytest.mark.parametrize("name", PROBES)
def test_tiny_downscaled_face_is_rejected_as_too_small(pipeline: Pipeline, faces_dir: Path,
                                                       name: str) -> None:
    image = _image(pipeline, faces_dir, name)
    full = largest_face(pipeline.analyse(np.asarray(image)))
    scale = 12.0 / full.quality.inter_eye_px
    size = (max(64, round(image.width * scale)), max(64, round(image.height * scale)))
    tiny = largest_face(pipeline.analyse(np.asarray(image.resize(size, Image.LANCZOS))))
    assert tiny is not None, "a 12 px inter-eye face is still detected"
    assert tiny.quality.inter_eye_px < DEFAULT_POLICY.min_inter_eye_px
    assert "face_too_small" in tiny.quality.reasons
    assert not tiny.quality.accepted


def test_half_profile_stranger_reads_turned_but_is_searched(pipeline: Pipeline,
                                                             faces_dir: Path) -> None:
    """Turned 40..60 degrees: matched as well as frontal faces on lfw-dev, so accepted."""
    faces = pipeline.analyse_bytes((faces_dir / "group_obama_biden.jpg").read_bytes())
    yaws = sorted(abs(f.quality.yaw_deg) for f in faces)
    assert len(faces) == 3 and yaws[0] < 20 and yaws[1] < 20
    assert 40 < yaws[2] < DEFAULT_POLICY.max_abs_yaw_deg
    assert all(f.quality.accepted for f in faces)


# -- the measures themselves, on constructed landmarks and crops ------------------------

def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = points.mean(axis=0)
    return (points - centre) @ r.T + centre


def test_template_landmarks_read_as_frontal() -> None:
    yaw, pitch, roll = pose_from_landmarks(ARCFACE_TEMPLATE)
    assert abs(yaw) < 2 and abs(pitch) < 2 and abs(roll) < 2


@pytest.mark.parametrize("degrees", [-30.0, 15.0, 40.0])
def test_roll_follows_the_eye_line(degrees: float) -> None:
    yaw, pitch, roll = pose_from_landmarks(_rotate(ARCFACE_TEMPLATE * 3, degrees))
    assert roll == pytest.approx(degrees, abs=0.5)
    assert abs(yaw) < 2 and abs(pitch) < 2  # rotation in the image plane is not yaw/pitch


def test_nose_off_centre_reads_as_yaw_and_pitch() -> None:
    kps = ARCFACE_TEMPLATE.copy()
    kps[2, 0] += 0.7 * (kps[1, 0] - kps[0, 0]) / 2  # nose towards the right eye
    assert pose_from_landmarks(kps)[0] > 40
    kps = ARCFACE_TEMPLATE.copy()
    kps[2, 1] -= 15  # nose up towards the eyes
    assert pose_from_landmarks(kps)[1] < -40


def test_laplacian_variance_orders_sharp_above_flat() -> None:
    rng = np.random.default_rng(0)
    assert laplacian_variance(np.full((112, 112), 128.0)) == 0.0
    noise = rng.uniform(0, 255, (112, 112))
    smooth = np.asarray(Image.fromarray(noise.astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(3)), dtype=np.float64)
    assert laplacian_variance(noise) > 100 * laplacian_variance(smooth)


def _assess(**overrides):
    kps = ARCFACE_TEMPLATE * 2 + 100  # 70 px between the eyes, frontal
    args = dict(det_score=0.8, bbox=np.array([90.0, 110.0, 260.0, 320.0]), kps=kps,
                image_shape=(480, 640, 3),
                crop_grey=np.random.default_rng(1).uniform(0, 255, (112, 112)))
    args.update(overrides)
    return assess(**args)


def test_constructed_good_face_is_accepted_and_serialisable() -> None:
    q = _assess()
    assert q.accepted and q.reasons == ()
    assert q.inter_eye_px == pytest.approx(2 * (73.5318 - 38.2946), rel=1e-3)
    d = json.loads(json.dumps(q.as_dict()))
    assert d["accepted"] is True and d["reasons"] == []


def test_each_failure_has_its_reason() -> None:
    assert "low_detector_score" in _assess(det_score=0.55).reasons
    assert "blurred" in _assess(crop_grey=np.full((112, 112), 90.0)).reasons
    assert "head_tilted_sideways" in _assess(kps=_rotate(ARCFACE_TEMPLATE * 2 + 100, 50)).reasons
    profile = ARCFACE_TEMPLATE * 2 + 100
    profile[2, 0] = profile[1, 0]  # nose tip under the far eye: a profile
    assert "head_turned" in _assess(kps=profile).reasons
    kps = ARCFACE_TEMPLATE * 2 + 100
    kps[3:, 1] = 479.5 + 10  # mouth below the bottom edge
    q = _assess(kps=kps, bbox=np.array([90.0, 110.0, 260.0, 500.0]))
    assert "landmarks_outside_image" in q.reasons and q.cut_by_border


def test_policy_is_configurable() -> None:
    strict = QualityPolicy(min_inter_eye_px=100.0)
    assert "face_too_small" in _assess(policy=strict).reasons
    assert _assess().accepted
