"""matcher calibrate: pair scoring, the tail fit, and the method on a population with a
known heavy tail (look-alike relatives), checked on a fresh population it never saw."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest

from matcher.calibrate.embedding import LOW_QUALITY, OK, embed_folder
from matcher.calibrate.fit import fit_score_model
from matcher.calibrate.pairs import score_pairs
from matcher.calibrate.run import calibrate
from matcher.errors import InvalidInput
from matcher.gallery.scoremodel import gpd_fit, gpd_isf


def population(n_ids: int, photos: int, seed: int, dim: int = 512):
    """Unit templates of ``n_ids`` people; a fifth have a look-alike relative."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    relative = rng.random(n_ids) < 0.2
    parent = rng.integers(0, n_ids, n_ids)
    distance = rng.uniform(0.5, 3.0, n_ids)
    centres[relative] = centres[parent[relative]] + distance[relative, None] * centres[relative]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, photos, axis=0) + 0.035 * rng.standard_normal((n_ids * photos, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.repeat(np.array([f"s{seed}-{i}" for i in range(n_ids)]), photos)
    return x.astype(np.float32), ids


CALIBRATION_JOBS = ("embedding", "pairs", "noise", "fit", "groups", "report", "run")


@pytest.mark.parametrize("job", CALIBRATION_JOBS)
def test_each_calibration_job_imports_alone(job):
    """matcher/calibrate/ is one module per job, each importable on its own; the jobs that
    work on templates already made (pairs, label noise, the fits, the group report) load
    no ONNX Runtime, so a benchmark can refit cached templates without a pipeline."""
    loaded = subprocess.run(
        [sys.executable, "-c", f"import matcher.calibrate.{job}, sys; print(*sys.modules)"],
        capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert f"matcher.calibrate.{job}" in loaded
    if job not in ("embedding", "run"):
        assert "onnxruntime" not in loaded and "matcher.face.pipeline" not in loaded


def test_pairs_are_every_pair_exactly_once():
    x, ids = population(40, 3, 7)
    pairs = score_pairs(x, ids, tail_keep=0.1, block=16)  # several blocks
    genuine, impostor = [], []
    for i, j in itertools.combinations(range(len(x)), 2):
        (genuine if ids[i] == ids[j] else impostor).append(float(x[i] @ x[j]))
    assert len(pairs.genuine) == len(genuine) and pairs.impostor_pairs == len(impostor)
    np.testing.assert_allclose(np.sort(pairs.genuine), np.sort(genuine), atol=1e-5)
    expected_tail = np.sort([s for s in impostor if s > 0.1])
    np.testing.assert_allclose(np.sort(pairs.tail), expected_tail, atol=1e-5)
    assert all(pairs.identity_names[a] != pairs.identity_names[b]
               for a, b in zip(pairs.tail_a, pairs.tail_b, strict=True))


@pytest.mark.parametrize("xi,sigma", [(0.25, 0.02), (-0.3, 0.05), (0.0, 0.03)])
def test_tail_fit_recovers_known_parameters(xi, sigma):
    rng = np.random.default_rng(3)
    excess = gpd_isf(rng.random(20_000), xi, sigma)
    got_xi, got_sigma = gpd_fit(excess)
    assert got_xi == pytest.approx(xi, abs=0.04)
    assert got_sigma == pytest.approx(sigma, rel=0.08)
    with pytest.raises(InvalidInput, match="at least 10"):
        gpd_fit(excess[:5])


def test_thresholds_hold_on_people_the_fit_never_saw():
    fit_x, fit_ids = population(600, 3, seed=1)
    model = fit_score_model(score_pairs(fit_x, fit_ids), "synthetic", "settings",
                            bootstrap=100)
    fresh = score_pairs(*population(2500, 3, seed=2))  # 28 M impostor pairs

    def measured(threshold: float) -> float:
        return float((fresh.tail >= threshold).sum()) / fresh.impostor_pairs

    mids = (fresh.bin_edges[:-1] + fresh.bin_edges[1:]) / 2
    fit = score_pairs(fit_x, fit_ids)
    mean = float((mids * fit.histogram).sum() / fit.impostor_pairs)
    sd = float(np.sqrt(((mids - mean) ** 2 * fit.histogram).sum() / fit.impostor_pairs))
    for fmr in (1e-4, 1e-5):
        assert measured(model.threshold_at_fmr(fmr)) <= fmr
        assert model.threshold_at_fmr(fmr) >= model.threshold_estimate(fmr)
    # The check has teeth: a Gaussian of the bulk (the old method) misses this tail.
    gaussian = mean - NormalDist().inv_cdf(1e-5) * sd
    assert measured(gaussian) > 1e-5
    assert model.max_gallery_size(1e-3) == int(1e-3 / model.fmr_floor)


def test_calibrate_runs_the_served_pipeline_and_refuses_too_little_data(
        pipeline, faces_dir, face_labels, tmp_path):
    embedded = embed_folder(faces_dir, pipeline, cache_dir=tmp_path, workers=1)
    assert list(embedded.files) == list(face_labels)
    for file, status, template in zip(embedded.files, embedded.status, embedded.templates,
                                      strict=True):
        assert status in (OK, LOW_QUALITY), file
        assert abs(float(np.linalg.norm(template)) - 1.0) < 1e-4
    # the cache is reused: same labels, same settings
    assert next(tmp_path.glob("embedded-*.npz")).exists()
    again = embed_folder(faces_dir, pipeline, cache_dir=tmp_path, workers=1)
    np.testing.assert_array_equal(again.templates, embedded.templates)
    # 25 photos of 6 people cannot show an impostor tail: refused with the reason
    with pytest.raises(InvalidInput, match="too little data"):
        calibrate(faces_dir, pipeline, cache_dir=tmp_path, bootstrap=10)


def test_thresholds_command_prints_what_the_service_uses():
    out = subprocess.run([sys.executable, "-m", "matcher.cli", "thresholds", "--json",
                          "--gallery-size", "30000"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    doc = json.loads(out)
    from matcher.face.models import default_pack
    from matcher.gallery.decision import DecisionPolicy, operating_point_1toN
    from matcher.gallery.scoremodel import load_score_model

    model = load_score_model(default_pack().model_id)
    policy = DecisionPolicy()
    assert doc["model_id"] == model.model_id
    assert doc["one_to_one"]["fmr"] == policy.fmr_1to1
    assert doc["one_to_one"]["threshold"] == pytest.approx(
        model.threshold_at_fmr(policy.fmr_1to1), abs=1e-6)
    many = operating_point_1toN(model, policy.fpir_1toN, 30000, policy.min_threshold,
                                policy.confidence_1toN)
    assert doc["one_to_many"] == {**doc["one_to_many"], "fpir": policy.fpir_1toN,
                                  "gallery_size": 30000, "supported": many.supported}
    assert doc["one_to_many"]["threshold"] == pytest.approx(many.threshold, abs=1e-6)
    assert doc["score_model"]["settings_hash"] == model.settings_hash


async def _wait_for(task):
    return await task


def test_server_refuses_a_score_model_of_other_pipeline_settings(pipeline, tmp_path):
    import dataclasses

    from service_helpers import ServerThread

    from matcher.errors import GalleryError
    from matcher.face.models import default_pack
    from matcher.gallery.scoremodel import load_score_model
    from matcher.service.server import ServerConfig

    stale = dataclasses.replace(load_score_model(default_pack().model_id),
                                settings_hash="0123456789abcdef")
    path = tmp_path / "stale.json"
    stale.save(path)
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data",
                          metrics_listen=None, score_model=path)
    server = ServerThread(config, pipeline, wait=False).start()
    try:
        with pytest.raises(GalleryError, match="Re-calibrate"):
            server.call(_wait_for(server.running._loader))
        assert not (tmp_path / "data" / "gallery.sqlite3").exists()  # refused before loading
    finally:
        server.stop()


def test_identify_beyond_the_supported_gallery_size_says_so(pipeline, tmp_path):
    """A gallery larger than the score model supports for the configured FPIR: every 1:N
    answer carries beyond_calibration, GetGalleryInfo reports the limit, Clear does not."""
    from service_helpers import ServerThread
    from synthetic import unit

    from matcher.client import MatcherClient, make_probe
    from matcher.face.models import default_pack
    from matcher.gallery.decision import DecisionPolicy
    from matcher.gallery.scoremodel import load_score_model
    from matcher.service.server import ServerConfig
    from matcher.v1 import matcher_pb2 as pb

    model = load_score_model(default_pack().model_id)
    fpir = 40 * model.supported_floor    # a strict target, so the limit is a few dozen
    n_max = model.max_gallery_size(fpir)
    templates = unit(np.random.default_rng(5).standard_normal((n_max + 1, 512)))
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data",
                          metrics_listen=None, policy=DecisionPolicy(fpir_1toN=fpir))
    with ServerThread(config, pipeline) as server, MatcherClient(server.address) as client:
        def enrol(rows):
            reqs = [client.enroll_request(f"T-{i:04d}", [make_probe(
                template=templates[i], model_id=pipeline.model_id)]) for i in rows]
            assert all(not r.HasField("error") for r in client.enroll_stream(reqs))

        enrol(range(n_max))
        info = client.gallery_info()
        assert info.max_supported_gallery_size == n_max and info.one_to_many_supported
        assert info.fpir_1ton == pytest.approx(fpir)
        assert info.score_model == model.settings_hash
        probe = templates[0] + 0.02 * templates[1]
        inside = client.identify(template=probe / np.linalg.norm(probe))
        assert not inside.beyond_calibration

        enrol([n_max])
        info = client.gallery_info()
        assert info.travellers == n_max + 1 and not info.one_to_many_supported
        beyond = client.identify(template=probe / np.linalg.norm(probe))
        assert beyond.beyond_calibration
        assert beyond.threshold >= inside.threshold
        claim = client.clear("T-0000", template=probe / np.linalg.norm(probe))
        assert claim.decision == pb.MATCH and not claim.beyond_calibration  # 1:1 claim holds


def test_fused_pairs_score_each_fused_booking_against_every_other_photo():
    from matcher.calibrate.pairs import fused_pairs
    from matcher.templates import fuse_templates

    x, ids = population(30, 4, 11)
    x, ids = x[:-2], ids[:-2]            # the last person keeps two photos: no genuine left
    pairs = fused_pairs(x, ids, tail_keep=0.0)
    owners = sorted(set(ids.tolist()))
    genuine, impostor = [], []
    for who in owners:
        rows = np.flatnonzero(ids == who)
        f = fuse_templates(x[rows[:2]])
        genuine += [float(x[i] @ f) for i in rows[2:]]
        impostor += [float(x[i] @ f) for i in np.flatnonzero(ids != who)]
    assert pairs.impostor_pairs == len(impostor)
    assert pairs.impostor_total(np.ones(len(pairs.identity_names))) == len(impostor)
    np.testing.assert_allclose(np.sort(pairs.genuine), np.sort(genuine), atol=1e-5)
    np.testing.assert_allclose(np.sort(pairs.tail), np.sort([s for s in impostor if s > 0]),
                               atol=1e-5)


def test_look_alikes_are_listed_and_kept_out_of_the_search_model_only():
    """Relatives score in the genuine range: calibrate lists them, keeps them in the 1:1
    model and states them apart in the model 1:N thresholds come from."""
    from dataclasses import replace

    from matcher.calibrate.fit import fit_with_kinds
    from matcher.calibrate.noise import label_noise
    from matcher.calibrate.pairs import drop_identity_pairs

    x, ids = population(600, 3, seed=4)
    rng = np.random.default_rng(4)
    twins = []
    for k in range(0, 30, 3):  # ten twins: another person, nearly the same face
        rows = x[ids == f"s4-{k}"] + 0.01 * rng.standard_normal((3, x.shape[1]))
        twins.append((rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32))
    x = np.concatenate([x, *twins])
    ids = np.concatenate([ids, np.repeat([f"twin-{k}" for k in range(0, 30, 3)], 3)])
    pairs = score_pairs(x, ids)
    floor = float(np.quantile(pairs.genuine, 0.05))
    noise = label_noise(pairs, floor)
    found = {frozenset((r["a"], r["b"])) for r in noise["look_alikes"]}
    assert {frozenset((f"s4-{k}", f"twin-{k}")) for k in range(0, 30, 3)} <= found
    assert all(r["best_score"] >= floor for r in noise["look_alikes"])
    kept = fit_with_kinds(x, ids, "m", "s", bootstrap=30)
    apart = fit_with_kinds(x, ids, "m", "s", drop=noise["look_alikes"], bootstrap=30)
    model = replace(kept, search=apart)
    assert model.for_search is apart and set(model.kinds) == {"fused"}
    fewer = drop_identity_pairs(pairs, noise["look_alikes"])
    assert fewer.tail.max() < pairs.tail.max()
    for fmr in (1e-4, 1e-5):
        assert apart.threshold_estimate(fmr) <= kept.threshold_estimate(fmr) + 1e-9
