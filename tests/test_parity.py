"""Parity with the reference: our templates agree with InsightFace's FaceAnalysis on the
same ONNX files, the same decoded pixels and the same 640x640 detector input.

insightface is a bench/dev extra, never a runtime dependency; its FaceAnalysis is pointed
at a temporary model root holding copies of the two files we ship with, so nothing is
downloaded and ~/.insightface is never touched.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from matcher.face.models import DETECTOR_FILE, EMBEDDER_FILE, vectron_model_dir
from matcher.face.pipeline import DetectorConfig, Pipeline

PARITY_FLOOR = 0.999
REFERENCE_SIZE = (640, 640)


@pytest.fixture(scope="module")
def face_analysis(tmp_path_factory):
    app = pytest.importorskip("insightface.app")
    root = tmp_path_factory.mktemp("insightface_root")
    pack = root / "models" / "buffalo_s"
    pack.mkdir(parents=True)
    for name in (DETECTOR_FILE, EMBEDDER_FILE):
        shutil.copyfile(vectron_model_dir() / name, pack / name)
    fa = app.FaceAnalysis(name="buffalo_s", root=str(root), providers=["CPUExecutionProvider"])
    fa.prepare(ctx_id=-1, det_size=REFERENCE_SIZE)
    assert set(fa.models) == {"detection", "recognition"}
    return fa


@pytest.fixture(scope="module")
def reference_sized(pipeline: Pipeline) -> Pipeline:
    return Pipeline(detector=DetectorConfig(input_size=REFERENCE_SIZE), sessions=pipeline.sessions)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_every_face_matches_face_analysis(face_analysis, reference_sized: Pipeline,
                                          faces_dir: Path, face_labels) -> None:
    worst = (1.0, "")
    for name in sorted(face_labels):
        image = reference_sized.decode((faces_dir / name).read_bytes())
        ours = reference_sized.analyse(image)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image deprecation inside
            theirs = face_analysis.get(np.ascontiguousarray(image[:, :, ::-1]))  # it wants BGR
        assert len(ours) == len(theirs), f"{name}: {len(ours)} faces vs {len(theirs)}"
        for face in ours:
            ref = max(theirs, key=lambda t: _iou(face.bbox, t.bbox))
            assert _iou(face.bbox, ref.bbox) > 0.95, name
            np.testing.assert_allclose(face.kps, ref.kps, atol=1.0, err_msg=name)
            assert face.det_score == pytest.approx(float(ref.det_score), abs=0.01), name
            cosine = float(face.template @ ref.normed_embedding)
            worst = min(worst, (cosine, name))
    assert worst[0] >= PARITY_FLOOR, f"lowest cosine {worst[0]:.5f} on {worst[1]}"
