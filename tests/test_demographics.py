"""Demographic groups in calibration (issue 21): within-group models, per-group rates, and
thresholds that hold in the worst group, on synthetic populations where one group has a
known heavier impostor tail (its people look more alike), checked on fresh draws."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import matcher.calibrate.run as calibrate_run
from matcher.calibrate.embedding import OK, Embedded
from matcher.calibrate.fit import fit_with_kinds
from matcher.calibrate.groups import GROUP_CONFIDENCE, MIN_GROUP_PEOPLE, attach_groups, read_groups
from matcher.calibrate.pairs import score_pairs
from matcher.calibrate.report import group_report
from matcher.calibrate.run import calibrate
from matcher.errors import InvalidInput
from matcher.gallery.decision import DecisionPolicy, operating_point_1to1, operating_point_1toN
from matcher.gallery.scoremodel import FUSED, SINGLE, ScoreModel

FMR = 1e-4  # resolved by a few hundred people, so a fresh draw can check the promise


def people(n_ids: int, photos: int, seed: int, *, alike: float = 0.0, prefix: str = "p",
           dim: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Unit templates of ``n_ids`` people, ``photos`` each. ``alike`` > 0 gives the group a
    shared component: its people look more alike, so its impostor tail is heavier."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if alike:
        shared = np.random.default_rng(12345).standard_normal(dim)  # same for every draw
        centres += alike * shared / np.linalg.norm(shared)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, photos, axis=0) + 0.035 * rng.standard_normal((n_ids * photos, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.repeat(np.array([f"{prefix}{seed}-{i}" for i in range(n_ids)]), photos)
    return x.astype(np.float32), ids


def two_groups(seed: int, heavy: int = 300, light: int = 600, tiny: int = 0):
    """(templates, identities, {identity: group}): "heavy" people look alike."""
    xa, ia = people(heavy, 3, seed, alike=0.45, prefix="h")
    xb, ib = people(light, 3, seed + 100, prefix="l")
    parts = [(xa, ia, "heavy"), (xb, ib, "light")]
    if tiny:
        parts.append((*people(tiny, 3, seed + 200, prefix="t"), "tiny"))
    x = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    groups = {str(i): g for _, group_ids, g in parts for i in np.unique(group_ids)}
    return x, ids, groups


def within_fmr(x: np.ndarray, ids: np.ndarray, threshold: float) -> float:
    pairs = score_pairs(x, ids)
    return float((pairs.tail >= threshold).sum() / pairs.impostor_pairs)


@pytest.fixture(scope="module")
def fitted():
    x, ids, groups = two_groups(seed=1, tiny=12)
    base = fit_with_kinds(x, ids, "synthetic", "settings", bootstrap=60)
    model, skipped = attach_groups(base, x, ids, groups, bootstrap=60)
    return SimpleNamespace(x=x, ids=ids, groups=groups, base=base, model=model,
                           skipped=skipped)


def test_groups_are_read_from_an_optional_column(tmp_path):
    (tmp_path / "labels.csv").write_text("file,identity\na.jpg,A\n")
    assert read_groups(tmp_path) == {}
    (tmp_path / "labels.csv").write_text(
        "file,identity,group\na.jpg,A,KZ\nb.jpg,A,KZ\nc.jpg,B,\nd.jpg,C,CN\n")
    assert read_groups(tmp_path) == {"A": "KZ", "C": "CN"}  # B: no group
    (tmp_path / "labels.csv").write_text("file,identity,group\na.jpg,A,KZ\nb.jpg,A,CN\n")
    with pytest.raises(InvalidInput, match="one group"):
        read_groups(tmp_path)


def test_small_groups_are_named_and_left_out(fitted):
    assert set(fitted.model.groups) == {"heavy", "light"}
    assert "fewer than 30" in fitted.skipped["tiny"] and MIN_GROUP_PEOPLE == 30
    heavy = fitted.model.groups["heavy"]
    assert heavy.document["group"]["people"] == 300 and set(heavy.kinds) == {"fused"}
    assert fitted.model.for_search.groups.keys() == fitted.model.groups.keys()


def test_worst_group_threshold_holds_in_the_heavy_group_on_a_fresh_draw(fitted):
    """At the population's threshold the heavy group's people false-match far above the
    promise; at the worst-group threshold (strict: each group at the 95 % bound) they do
    not, on people the fit never saw. The light group pays in FNMR, not in FMR."""
    strict = fitted.model.with_group_confidence(None)
    population = fitted.model.with_worst_group(False)
    fresh_x, fresh_ids, fresh_groups = two_groups(seed=7)
    heavy = np.array([fresh_groups[str(i)] == "heavy" for i in fresh_ids])
    t_population = population.threshold_at_fmr(FMR, 0.95, SINGLE)
    t_worst = strict.threshold_at_fmr(FMR, 0.95, SINGLE)
    assert within_fmr(fresh_x[heavy], fresh_ids[heavy], t_population) > 3 * FMR
    assert within_fmr(fresh_x[heavy], fresh_ids[heavy], t_worst) <= FMR
    assert within_fmr(fresh_x[~heavy], fresh_ids[~heavy], t_worst) <= FMR
    # the rule is the maximum of the population's and each group's own threshold
    own = fitted.model.groups["heavy"].threshold_at_fmr(FMR, 0.95, SINGLE)
    assert t_worst == pytest.approx(max(t_population, own))
    assert t_worst > t_population


def test_group_confidence_sits_between_population_and_strict(fitted):
    model = fitted.model
    assert model.worst_group and model.group_confidence == GROUP_CONFIDENCE
    for kind in (SINGLE, FUSED, None):
        population = model.with_worst_group(False).threshold_at_fmr(FMR, 0.95, kind)
        median = model.threshold_at_fmr(FMR, 0.95, kind)
        strict = model.with_group_confidence(None).threshold_at_fmr(FMR, 0.95, kind)
        assert population <= median <= strict
    # a group's bound is never taken above the threshold's own confidence (1:N at 0.5)
    lax = model.with_group_confidence(0.99)
    assert lax.threshold_at_fmr(FMR, 0.5) == pytest.approx(
        model.with_group_confidence(0.5).threshold_at_fmr(FMR, 0.5))


def test_decisions_need_no_group_lookup(fitted):
    """decision.py asks the score model for targets as before; the worst-group rule is in
    the model's thresholds, not in a lookup of who the traveller is."""
    policy = DecisionPolicy(fmr_1to1=FMR)
    for kind in (SINGLE, FUSED):
        point = operating_point_1to1(fitted.model, FMR, policy.min_threshold, 0.95, kind)
        assert point.threshold == pytest.approx(fitted.model.threshold_at_fmr(FMR, 0.95, kind))
        plain = operating_point_1to1(fitted.base, FMR, policy.min_threshold, 0.95, kind)
        assert point.threshold >= plain.threshold
    many = operating_point_1toN(fitted.model, 1e-3, 10, policy.min_threshold, 0.5)
    assert many.threshold >= operating_point_1toN(fitted.base, 1e-3, 10,
                                                  policy.min_threshold, 0.5).threshold
    # the gallery size the data supports is the population's: groups move thresholds only
    assert fitted.model.supported_floor == fitted.base.supported_floor
    assert many.max_gallery_size == fitted.base.max_gallery_size(1e-3)


def test_off_is_the_population_model(fitted):
    off = fitted.model.with_worst_group(False)
    assert not off.worst_group and not off.for_search.worst_group
    for fmr in (1e-3, FMR, 1e-5):
        for kind in (SINGLE, FUSED, None):
            assert off.threshold_at_fmr(fmr, 0.95, kind) == fitted.base.threshold_at_fmr(
                fmr, 0.95, kind)
        assert off.fmr_upper_at(0.3) == fitted.base.fmr_upper_at(0.3)


def test_the_json_keeps_groups_and_loads_without_them(fitted, tmp_path):
    path = tmp_path / "grouped.json"
    fitted.model.save(path)
    again = ScoreModel.load(path)
    assert again.worst_group and again.group_confidence == GROUP_CONFIDENCE
    assert set(again.groups) == {"heavy", "light"} and set(again.for_search.groups) == {
        "heavy", "light"}
    for fmr in (1e-3, FMR, 1e-5):
        for kind in (SINGLE, FUSED):
            assert again.threshold_at_fmr(fmr, 0.95, kind) == pytest.approx(
                fitted.model.threshold_at_fmr(fmr, 0.95, kind), abs=1e-5)
    # a model without groups writes no group fields; the format is unchanged
    doc = fitted.base.to_document()
    assert "groups" not in doc and "worst_group" not in doc
    assert json.loads(path.read_text())["format"] == doc["format"]
    # switching the rule off keeps the groups (for the report) and says so in the file
    off = fitted.model.with_worst_group(False)
    off.save(path)
    assert not ScoreModel.load(path).worst_group and ScoreModel.load(path).groups


def test_group_report_measures_each_group_and_the_price(fitted):
    policy = DecisionPolicy(fmr_1to1=FMR)
    rep = group_report(fitted.model, fitted.x, fitted.ids, fitted.groups, policy,
                       sizes=(10, 100), bootstrap=40)
    assert rep["reported"] == ["heavy", "light"] and rep["worst_group"]
    assert [(r["mode"], r["kind"], r["gallery_size"]) for r in rep["points"]] == [
        ("1:1", SINGLE, None), ("1:1", FUSED, None), ("1:N", SINGLE, 10), ("1:N", FUSED, 10),
        ("1:N", SINGLE, 100), ("1:N", FUSED, 100)]
    one = rep["points"][0]
    assert one["threshold"]["worst_group"] >= one["threshold"]["population"]
    heavy, light = one["rates"]["heavy"], one["rates"]["light"]
    assert heavy["population"]["resolved"]
    assert heavy["population"]["fmr"] > 3 * FMR          # the differential, measured
    lo, hi = heavy["population"]["fmr_ci95"]
    assert lo <= heavy["population"]["fmr"] <= hi
    assert one["differential"]["highest_fmr"] == "heavy"
    # the light group has no false match at the population's threshold: no measured ratio,
    # the tail fits' ratio instead
    assert light["population"]["false_matches"] == 0
    assert one["differential"]["max_over_min_measured"] is None
    assert one["differential"]["max_over_min_model"] > 3
    assert heavy["population"]["fmr_ratio_to_all"] > 1
    for entry in (heavy, light, one["rates"]["all"]):
        assert entry["fnmr_price"] >= 0
        assert entry["worst_group"]["fmr"] <= entry["population"]["fmr"]
    # the measured rate is the plain count of within-group pairs at the threshold
    mask = np.array([fitted.groups[str(i)] == "heavy" for i in fitted.ids])
    t = one["threshold"]["population"]
    assert heavy["population"]["fmr"] == pytest.approx(
        within_fmr(fitted.x[mask], fitted.ids[mask], t), rel=1e-6)


def test_calibrate_with_a_group_column(tmp_path, monkeypatch):
    """The whole `matcher calibrate` run with groups: labels.csv's group column reaches
    the model (worst-group rule on by default) and the report; --no-worst-group keeps the
    groups but not the rule. The photos are synthetic templates (embed_folder replaced)."""
    x, ids, groups = two_groups(seed=3)
    rows = [("file", "identity", "group")] + [
        (f"images/{who}_{k}.jpg", who, groups[who]) for k, who in enumerate(ids)]
    (tmp_path / "labels.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    embedded = Embedded(np.array([r[0] for r in rows[1:]]), ids.astype(str),
                        np.full(len(ids), OK), np.full(len(ids), ""), x, "settings", "sha")
    monkeypatch.setattr(calibrate_run, "embed_folder", lambda *a, **k: embedded)
    pipeline = SimpleNamespace(model_id="synthetic", settings_hash=lambda: "settings",
                               score_settings=lambda: {})
    model, report = calibrate(tmp_path, pipeline, bootstrap=30)
    assert model.worst_group and set(model.groups) == {"heavy", "light"}
    assert model.document["source"]["groups"]["reported"] == ["heavy", "light"]
    assert report["groups"]["points"][0]["rates"]["heavy"]["population"]["fmr"] > 0
    plain, _ = calibrate(tmp_path, pipeline, bootstrap=30, worst_group=False)
    assert not plain.worst_group and plain.groups
    assert plain.threshold_at_fmr(1e-5) <= model.threshold_at_fmr(1e-5)
    (tmp_path / "labels.csv").write_text("\n".join(",".join(r[:2]) for r in rows) + "\n")
    with pytest.raises(InvalidInput, match="group' column"):
        calibrate(tmp_path, pipeline, bootstrap=30, worst_group=True)


def test_thresholds_table_shows_the_groups(fitted, tmp_path):
    path = tmp_path / "grouped.json"
    fitted.model.save(path)
    out = subprocess.run([sys.executable, "-m", "matcher.cli", "thresholds", "--table",
                          "--score-model", str(path)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "Within-group rates (worst-group rule on" in out
    assert "| 1:1 | FMR 1e-05 | single | heavy |" in out and "(worst group)" in out
    off = subprocess.run([sys.executable, "-m", "matcher.cli", "thresholds", "--json",
                          "--no-worst-group", "--score-model", str(path)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    doc = json.loads(off)
    assert doc["groups"]["worst_group"] is False
    assert doc["one_to_one"]["threshold"] == pytest.approx(
        fitted.model.with_worst_group(False).threshold_at_fmr(1e-5), abs=1e-6)


def test_the_command_line_defaults_are_the_library_defaults():
    from matcher.cli import build_parser

    args = build_parser("calibrate").parse_args(["calibrate", "--labels", "d", "--out", "o"])
    assert args.worst_group is None  # on where groups are given
    assert args.group_confidence == GROUP_CONFIDENCE
    assert args.min_group_people == MIN_GROUP_PEOPLE
