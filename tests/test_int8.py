"""The int8 embedder variant: pinned, close to fp32 on real faces, served with its own
score model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from matcher.errors import ModelIntegrityError
from matcher.face.models import (
    EMBEDDER_INT8_FILE,
    EMBEDDER_INT8_SHA256,
    EMBEDDER_SHA256,
    VARIANT_DIR,
    ModelFile,
    ModelPack,
    default_pack,
    load_sessions,
)
from matcher.face.pipeline import Pipeline
from matcher.gallery.scoremodel import check_settings, load_score_model


def test_an_unbuilt_int8_embedder_is_refused_with_the_build_step(monkeypatch, tmp_path):
    monkeypatch.setattr("matcher.face.models.VARIANT_DIR", tmp_path)
    with pytest.raises(ModelIntegrityError, match="quantize_embedder"):
        default_pack("int8")


# The int8 file is built locally from lfw-dev (docs/int8-embedder.md), never committed.
needs_int8 = pytest.mark.skipif(not (VARIANT_DIR / EMBEDDER_INT8_FILE).exists(),
                                reason="int8 embedder not built here (optional; "
                                       "scripts/quantize_embedder.py)")

# Measured on the 26 faces of tests/data/faces (2026-12-01): median 0.9959, min 0.9926;
# on 3,892 held-out lfw-dev photos median 0.995, 1st percentile 0.991 (scripts/int8_gate.py).
MIN_COSINE = 0.985
MEDIAN_COSINE = 0.993


@pytest.fixture(scope="module")
def int8() -> Pipeline:
    return Pipeline(default_pack("int8"), threads=1)


@needs_int8
def test_the_variant_is_pinned_and_has_its_own_model_id(int8, pipeline):
    pack = default_pack("int8")
    assert hashlib.sha256(pack.embedder.path.read_bytes()).hexdigest() == EMBEDDER_INT8_SHA256
    assert pack.embedder.sha256 == EMBEDDER_INT8_SHA256 != EMBEDDER_SHA256
    assert pack.detector == default_pack().detector
    assert int8.model_id == f"scrfd500m-mbf-w600k-int8@{EMBEDDER_INT8_SHA256[:12]}"
    assert int8.model_id != pipeline.model_id
    assert int8.settings_hash() != pipeline.settings_hash()
    with pytest.raises(ValueError, match="precision"):
        default_pack("fp16")


@needs_int8
def test_a_changed_int8_file_is_refused(tmp_path: Path):
    pack = default_pack("int8")
    data = bytearray(pack.embedder.path.read_bytes())
    data[-1] ^= 1
    (tmp_path / "int8.onnx").write_bytes(bytes(data))
    bad = ModelPack(pack.detector, ModelFile(tmp_path / "int8.onnx", EMBEDDER_INT8_SHA256),
                    pack.name)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_sessions(bad)


@needs_int8
def test_templates_agree_with_fp32_on_the_shared_photos(int8, pipeline, faces_dir: Path):
    cosines = []
    for path in sorted(faces_dir.glob("*.jpg")):
        image = pipeline.decode(path.read_bytes())
        found = pipeline.detect(image)
        blob = pipeline.align(image, found.kps)  # the same aligned faces for both
        cosines += list(np.einsum("ij,ij->i", pipeline.embed(blob), int8.embed(blob)))
    cosines = np.array(cosines)
    assert len(cosines) >= 25
    assert cosines.min() >= MIN_COSINE, f"min cosine {cosines.min():.4f}"
    assert np.median(cosines) >= MEDIAN_COSINE, f"median cosine {np.median(cosines):.4f}"


@needs_int8
def test_served_int8_pipeline_matches_its_shipped_score_model(int8):
    """Re-derive with 'matcher calibrate --embedder-precision int8 --labels
    LFW_DEV_DIR --out matcher/score_models/<model_id with _ for @>.json'."""
    shipped = load_score_model(int8.model_id)
    assert shipped.model_id == int8.model_id
    assert shipped.settings_hash == int8.settings_hash(), (
        "the int8 pipeline's settings no longer match its shipped score model")
    check_settings(shipped, int8.settings_hash(), int8.model_id)
    assert shipped.document["source"]["identities"] > 1000
