"""Operating points and decision rules (the real-face behaviour is in test_gallery_faces.py)."""
from __future__ import annotations

import pytest

from matcher.decision import (W600K_MBF, DecisionPolicy, Outcome, Reason, ScoreModel,
                              decide_identification, operating_point_1to1,
                              operating_point_1toN, per_comparison_fmr, score_model_for)
from matcher.errors import GalleryError, InvalidInput
from matcher.index import Candidate
from matcher.models import default_pack


def test_default_model_has_operating_points():
    assert score_model_for(default_pack().model_id) is W600K_MBF
    with pytest.raises(GalleryError, match="no operating points"):
        score_model_for("unknown@0")


def test_threshold_inverts_the_fmr_model():
    for fmr in (1e-2, 1e-4, 1e-6, 1e-9, 1e-12):
        t = W600K_MBF.threshold_at_fmr(fmr)
        assert W600K_MBF.fmr_at(t) == pytest.approx(fmr, rel=1e-6)
    with pytest.raises(InvalidInput):
        W600K_MBF.threshold_at_fmr(0.0)


def test_fpir_formula_and_thresholds_rise_with_gallery_size():
    fpir = 1e-3
    for n in (1, 10, 10_000, 10_000_000):
        fmr = per_comparison_fmr(fpir, n)
        assert 1 - (1 - fmr) ** n == pytest.approx(fpir, rel=1e-6)
        assert fmr == pytest.approx(fpir / n, rel=1e-3)
    ts = [operating_point_1toN(W600K_MBF, fpir, n, 0.0).threshold
          for n in (10, 1_000, 100_000, 10_000_000)]
    assert ts == sorted(ts) and ts[0] < ts[-1]


def test_default_thresholds_sit_between_observed_impostors_and_genuines():
    policy = DecisionPolicy()
    t11 = operating_point_1to1(W600K_MBF, policy.fmr_1to1, policy.min_threshold).threshold
    assert W600K_MBF.impostor_max < t11 < W600K_MBF.genuine_min
    # up to a million travellers the 1:N threshold still accepts the weakest real genuine
    t1n = operating_point_1toN(W600K_MBF, policy.fpir_1toN, 1_000_000,
                               policy.min_threshold).threshold
    assert W600K_MBF.impostor_max < t1n < W600K_MBF.genuine_min


def test_floor_applies_to_loose_targets():
    loose = ScoreModel("m", 0.0, 0.01, 0.05, 0.6, "test")
    assert operating_point_1to1(loose, 0.1, floor=0.2).threshold == 0.2


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
