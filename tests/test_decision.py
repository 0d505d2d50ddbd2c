"""Operating points and decision rules (the real-face behaviour is in test_gallery_faces.py)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from matcher.errors import GalleryError, InvalidInput
from matcher.face.models import default_pack
from matcher.gallery.decision import (
    DecisionPolicy,
    Outcome,
    Reason,
    decide_identification,
    operating_point_1to1,
    operating_point_1toN,
    per_comparison_fmr,
)
from matcher.gallery.scoremodel import ScoreModel, check_settings, load_score_model
from matcher.templates import Candidate


@pytest.fixture(scope="module")
def shipped() -> ScoreModel:
    return load_score_model(default_pack().model_id)


def test_the_default_model_ships_a_score_model(shipped):
    assert shipped.model_id == default_pack().model_id
    assert shipped.document["source"]["identities"] > 1000  # made from thousands of people
    with pytest.raises(GalleryError, match="no score model ships"):
        load_score_model("unknown@0")


def test_served_pipeline_still_matches_the_shipped_score_model(pipeline, shipped):
    """A change that moves scores (detector, quality gate, models, SCORE_REVISION) must
    re-derive the shipped score model: 'matcher calibrate' (docs/operating-points.md)."""
    assert shipped.settings_hash == pipeline.settings_hash(), (
        "the served pipeline's settings no longer match the shipped score model: run "
        "'matcher calibrate --labels LFW_DEV_DIR --out matcher/score_models/"
        "scrfd500m-mbf-w600k_9cc6e4a75f0e.json'")
    check_settings(shipped, pipeline.settings_hash(), pipeline.model_id)


def test_a_score_model_of_other_settings_is_refused(pipeline, shipped):
    other = dataclasses.replace(shipped, settings_hash="0" * 16)
    with pytest.raises(GalleryError, match="Re-calibrate"):
        check_settings(other, pipeline.settings_hash(), pipeline.model_id)


def test_score_model_pipeline_and_gallery_are_checked_together_in_one_place(pipeline, shipped,
                                                                          tmp_path):
    """Whichever of the three is the odd one out, one check refuses it with one message."""
    from matcher.gallery.primary import PrimaryGallery
    from matcher.service.engine import MatchEngine

    settings, model_id = pipeline.settings_hash(), pipeline.model_id
    check_settings(shipped, settings, model_id, model_id)
    odd_ones = [(dataclasses.replace(shipped, model_id="other@0"), settings, model_id, None),
                (shipped, "0" * 16, model_id, None),
                (shipped, settings, model_id, "other@0")]
    for model, hash_, pipeline_model, gallery_model in odd_ones:
        with pytest.raises(GalleryError, match="its thresholds would not hold"):
            check_settings(model, hash_, pipeline_model, gallery_model)
    with PrimaryGallery.open(tmp_path, "other@0") as gallery, \
            pytest.raises(GalleryError, match="the gallery holds other@0: its thresholds"):
        MatchEngine(pipeline, gallery, score_model=shipped)


def test_thresholds_are_conservative_and_monotone(shipped):
    fmrs = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    for confidence in (0.5, 0.75, 0.95):
        upper = [shipped.threshold_at_fmr(f, confidence) for f in fmrs]
        assert upper == sorted(upper)
    upper = [shipped.threshold_at_fmr(f, 0.95) for f in fmrs]
    population = shipped.with_worst_group(False)
    for f, t in zip(fmrs, upper, strict=True):
        # the groups are held at their own level (group_confidence), so the bound is
        # compared with the population's estimate, and the group rule only ever raises it
        assert t >= population.threshold_estimate(f) - 1e-12
        assert t >= population.threshold_at_fmr(f, 0.95) - 1e-12
        # a higher confidence never lowers a threshold
        assert t >= shipped.threshold_at_fmr(f, 0.5) - 1e-12
        # every comparison kind is held to the promise
        for kind in ("single", "fused"):
            assert t >= shipped.threshold_at_fmr(f, 0.95, kind) - 1e-12
    # the point estimate inverts the tail model where the tail model applies
    for f in (1e-5, 1e-6):
        assert shipped.fmr_at(shipped.threshold_estimate(f)) == pytest.approx(f, rel=1e-3)
    with pytest.raises(InvalidInput):
        shipped.threshold_at_fmr(0.0)
    with pytest.raises(InvalidInput):
        shipped.threshold_at_fmr(1e-5, 1.0)


def test_one_to_many_uses_the_union_bound_and_flags_unsupported_sizes(shipped):
    assert per_comparison_fmr(1e-3, 1000) == pytest.approx(1e-6)
    assert per_comparison_fmr(1e-3, 0) == pytest.approx(1e-3)
    n_max = shipped.max_gallery_size(1e-3)
    assert n_max >= 1
    inside = operating_point_1toN(shipped, 1e-3, n_max, 0.0)
    beyond = operating_point_1toN(shipped, 1e-3, n_max * 2, 0.0)
    assert inside.supported and not beyond.supported
    assert inside.max_gallery_size == n_max
    ts = [operating_point_1toN(shipped, 1e-3, n, 0.0).threshold for n in (10, 1_000, 100_000)]
    assert ts == sorted(ts) and ts[0] < ts[-1]


def test_floor_applies_to_loose_targets(shipped):
    assert operating_point_1to1(shipped, 0.5, floor=0.2).threshold == 0.2


def test_score_model_file_round_trips(tmp_path, shipped):
    path = tmp_path / "model.json"
    shipped.save(path)
    again = ScoreModel.load(path)
    for f in (1e-3, 1e-5, 1e-7):
        for c in (0.5, 0.95):
            assert again.threshold_at_fmr(f, c) == pytest.approx(shipped.threshold_at_fmr(f, c))
        assert again.threshold_estimate(f) == pytest.approx(shipped.threshold_estimate(f))
    assert set(again.kinds) == {"fused"}
    doc = json.loads(path.read_text())
    doc["format"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(GalleryError, match="format"):
        ScoreModel.load(path)
    path.write_text("{not json")
    with pytest.raises(GalleryError, match="cannot read score model"):
        ScoreModel.load(path)


def _models(m: ScoreModel, path: str = "model"):
    """The model and every model inside it (kinds, search, groups), by path."""
    yield path, m
    for name, sub in m.kinds.items():
        yield from _models(sub, f"{path}.kinds.{name}")
    if m.search is not None:
        yield from _models(m.search, f"{path}.search")
    for name, sub in m.groups.items():
        yield from _models(sub, f"{path}.groups.{name}")


def assert_same_model(a: ScoreModel, b: ScoreModel) -> None:
    """Every array a threshold is taken from, equal to the bit, in every inner model."""
    pairs = dict(_models(a)), dict(_models(b))
    assert pairs[0].keys() == pairs[1].keys()
    for path, x in pairs[0].items():
        y = pairs[1][path]
        assert x.tail == y.tail and x.fmr_floor == y.fmr_floor, path
        for name in ("replicates", "empirical", "genuine", "resolved_fmr",
                     "resolved_thresholds"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=path)


def test_a_score_model_is_read_back_unchanged_whichever_way_it_was_written(tmp_path, shipped):
    """The compact file (thresholds in whole units of 1e-5) and the older one (decimals,
    indented) read to the same floats: every threshold to the last digit."""
    compact = tmp_path / "compact.json"
    shipped.save(compact)
    assert_same_model(ScoreModel.load(compact), shipped)

    def as_decimals(doc):
        if isinstance(doc, dict):
            doc = {k: as_decimals(v) for k, v in doc.items()}
            if "thresholds_e5" in doc:
                doc["thresholds"] = np.round(np.asarray(doc.pop("thresholds_e5")) / 1e5,
                                             5).tolist()
            return doc
        return [as_decimals(v) for v in doc] if isinstance(doc, list) else doc

    older = tmp_path / "older.json"
    older.write_text(json.dumps(as_decimals(json.loads(compact.read_text())), indent=1))
    assert_same_model(ScoreModel.load(older), shipped)


def test_the_shipped_score_models_are_compact_and_give_the_calibrated_thresholds(shipped):
    """Each file is read at every start: under 1 MB. Its thresholds are the ones lfw-dev
    gave (docs/operating-points.md), to the last digit; re-calibrating changes them here."""
    import importlib.resources

    folder = importlib.resources.files("matcher.score_models")
    files = [f for f in folder.iterdir() if f.name.endswith(".json")]
    assert len(files) == 2 and all(len(f.read_bytes()) < 1_000_000 for f in files)
    policy = DecisionPolicy()
    one_to_one = {kind: operating_point_1to1(shipped, 1e-5, policy.min_threshold,
                                             policy.confidence_1to1, kind).threshold
                  for kind in ("single", "fused")}
    assert one_to_one == {"single": 0.3817785525172104, "fused": 0.38580614658714885}
    assert [operating_point_1toN(shipped, policy.fpir_1toN, n, policy.min_threshold,
                                 policy.confidence_1toN).threshold
            for n in (1_000, 23_593)] == [0.40649271720861063, 0.42507888672460675]


def C(tid, s):
    return Candidate(tid, s)


@pytest.mark.parametrize("cands,outcome,reason", [
    ([], Outcome.NO_MATCH, Reason.EMPTY_GALLERY),
    ([C("a", 0.30), C("b", 0.05)], Outcome.NO_MATCH, Reason.BELOW_THRESHOLD),
    ([C("a", 0.70), C("b", 0.65)], Outcome.NO_MATCH, Reason.AMBIGUOUS),
    ([C("a", 0.70), C("b", 0.10)], Outcome.MATCH, Reason.ABOVE_THRESHOLD),
    ([C("a", 0.70)], Outcome.MATCH, Reason.ABOVE_THRESHOLD),
])
def test_identification_rule(cands, outcome, reason):
    assert decide_identification(cands, 0.4, 0.1) == (outcome, reason)


def test_bad_policies_are_refused():
    with pytest.raises(InvalidInput):
        DecisionPolicy(fmr_1to1=0.0)
    with pytest.raises(InvalidInput):
        DecisionPolicy(margin=-0.1)


def test_a_traveller_is_one_fused_template_and_n_counts_who_is_booked_now(tmp_path):
    """Several booking photos are searched as one fused template, so N counts travellers;
    only travellers whose booking window is open count; a claim against fused photos is
    held to the fused comparisons' threshold, a single photo to the single ones'."""
    import numpy as np
    from synthetic import sha, unit

    from matcher.gallery.decision import Decider
    from matcher.gallery.primary import PrimaryGallery
    from matcher.gallery.scoremodel import FUSED, SINGLE
    from matcher.templates import fuse_templates

    model_id = default_pack().model_id
    rng = np.random.default_rng(0)
    day = 86_400.0
    gallery = PrimaryGallery.open(tmp_path, model_id)
    four = unit(rng.standard_normal((4, 512)))
    gallery.enroll("ONE", unit(rng.standard_normal((1, 512))), 0.0, day, [sha("a")])
    gallery.enroll("FOUR", four, 0.0, day, [sha(c) for c in "bcde"])
    for i in range(3):  # tomorrow's and the day after's bookings, in the same gallery
        gallery.enroll(f"LATER{i}", unit(rng.standard_normal((2, 512))), day * (1 + i),
                       day * (2 + i), [sha(f"x{i}"), sha(f"y{i}")])
    decider = Decider(gallery)
    model = decider.score_model
    probe = unit(rng.standard_normal(512))
    one, fused = decider.verify(probe, "ONE", now=10.0), decider.verify(probe, "FOUR", now=10.0)
    policy = decider.policy
    assert one.threshold == pytest.approx(max(policy.min_threshold, model.threshold_at_fmr(
        policy.fmr_1to1, policy.confidence_1to1, SINGLE)))
    assert fused.threshold == pytest.approx(max(policy.min_threshold, model.threshold_at_fmr(
        policy.fmr_1to1, policy.confidence_1to1, FUSED)))
    assert fused.score == pytest.approx(float(fuse_templates(four) @ probe), abs=1e-5)
    # the index holds one template per traveller; today's search counts today's travellers
    assert gallery.index_entries == gallery.size == 5 and gallery.template_count == 11
    assert decider.point_1toN(now=10.0).gallery_size == 2
    assert decider.point_1toN(now=day + 10).gallery_size == 1
    assert decider.point_1toN(now=10 * day).gallery_size == 0
    hit = decider.identify(fuse_templates(four), now=10.0)
    assert hit.traveller_id == "FOUR" and hit.score == pytest.approx(1.0, abs=1e-5)
    assert hit.threshold == pytest.approx(decider.point_1toN(now=10.0).threshold)
