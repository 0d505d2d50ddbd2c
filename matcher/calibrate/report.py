"""Per-group rates at the thresholds a score model sets: within-group FMR and FNMR with
identity-bootstrap intervals, measured and by each group's fitted tail, and the
across-group differential (the ``groups`` section of the calibration report)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..gallery.decision import DecisionPolicy, operating_point_1to1, operating_point_1toN
from ..gallery.scoremodel import FUSED, SINGLE, ScoreModel
from .fit import BOOTSTRAP, MIN_RESOLVED_PAIRS
from .groups import GROUP_COLUMN, MIN_GROUP_PEOPLE, group_of_rows
from .pairs import TAIL_KEEP_SCORE, PairScores, kind_pairs

GROUP_GALLERY_SIZES = (100, 1_000, 10_000)   # the 1:N points a group report shows


def _identity_bootstrap(m: int, bootstrap: int, seed: int) -> np.ndarray:
    """(bootstrap + 1, m) float64: row 0 all ones, then multinomial resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(m, np.full(m, 1.0 / m), size=bootstrap).astype(np.float64)
    return np.vstack([np.ones((1, m)), draws])


def _impostor_totals(pairs: PairScores, W: np.ndarray) -> np.ndarray:
    """(R,) PairScores.impostor_total for each row of identity weights W (R, m)."""
    per = W * pairs.photos_per_identity
    if pairs.fused_per_identity is None:
        return (per.sum(1) ** 2 - (per ** 2).sum(1)) / 2.0
    fused = W * pairs.fused_per_identity
    return fused.sum(1) * per.sum(1) - (fused * per).sum(1)


def measured_rates(pairs: PairScores, threshold: float, W: np.ndarray) -> dict:
    """FMR and FNMR of ``pairs`` at ``threshold``: the point (row 0 of the identity
    weights W) with its 95 % interval over the other rows."""
    if threshold <= TAIL_KEEP_SCORE:
        raise InvalidInput(f"rates are measured above {TAIL_KEEP_SCORE}, got {threshold}")
    above = pairs.tail >= threshold
    fmr = (W[:, pairs.tail_a[above]] * W[:, pairs.tail_b[above]]).sum(1) / np.maximum(
        _impostor_totals(pairs, W), 1e-12)
    wg = W[:, pairs.genuine_identity]
    fnmr = (wg * (pairs.genuine < threshold)).sum(1) / np.maximum(wg.sum(1), 1e-12)

    def ci(v: np.ndarray) -> list[float]:
        return [float(q) for q in np.quantile(v[1:], [0.025, 0.975])]

    return {"impostor_pairs": pairs.impostor_pairs, "false_matches": int(above.sum()),
            "fmr": float(fmr[0]), "fmr_ci95": ci(fmr),
            "genuine_pairs": int(len(pairs.genuine)), "fnmr": float(fnmr[0]),
            "fnmr_ci95": ci(fnmr) if len(pairs.genuine) else [float("nan")] * 2}


def group_report(model, templates: np.ndarray, identities: np.ndarray,
                 groups: dict[str, str], policy=None, *, drop: Sequence[dict] = (),
                 apart: Sequence[dict] = (), skipped: dict[str, str] | None = None,
                 sizes: tuple[int, ...] = GROUP_GALLERY_SIZES, bootstrap: int = BOOTSTRAP,
                 seed: int = 0, min_people: int = MIN_GROUP_PEOPLE) -> dict:
    """Per group, at the thresholds ``model`` sets (and at the population's, without the
    worst-group rule): within-group FMR and FNMR with identity-bootstrap 95 % intervals,
    whether the group's data resolves the target, its fitted tail's estimate and bound,
    the FNMR price, and the across-group differential (NIST IR 8280: one threshold for
    everyone, rates per group). 1:1 at the policy FMR for each booking kind; 1:N at each
    of ``sizes`` (per-comparison FMR = FPIR / N, pairs with the look-alikes ``apart``).

    ``model`` holds the groups (attach_groups); "all" is the whole population."""
    policy = policy or DecisionPolicy()
    population = model.with_worst_group(False)
    of_row = group_of_rows(identities, groups)
    members = {"all": np.ones(len(identities), bool),
               **{g: of_row == g for g in model.groups}}
    data = {}  # (member set, look-alikes apart) -> (pairs by kind, identity weights)
    for name, mask in members.items():
        for lean in (False, True):
            pairs = kind_pairs(templates[mask], identities[mask],
                               list(drop) + (list(apart) if lean else []))
            W = _identity_bootstrap(len(pairs[SINGLE].identity_names), bootstrap, seed)
            data[name, lean] = (pairs, W)

    # (mode, target, per-comparison FMR, gallery size (None for 1:1), kind)
    points: list[tuple[str, str, float, int | None, str]] = [
        ("1:1", f"FMR {policy.fmr_1to1:g}", policy.fmr_1to1, None, kind)
        for kind in (SINGLE, FUSED)]
    points += [("1:N", f"FPIR {policy.fpir_1toN:g} at N={n:,}", policy.fpir_1toN / n, n, kind)
               for n in sizes for kind in (SINGLE, FUSED)]

    def threshold(m: ScoreModel, fmr: float, n: int | None, kind: str) -> float:
        if n is None:
            return operating_point_1to1(m, fmr, policy.min_threshold,
                                        policy.confidence_1to1, kind).threshold
        return operating_point_1toN(m, policy.fpir_1toN, n, policy.min_threshold,
                                    policy.confidence_1toN).threshold

    rows = []
    for mode, target, fmr, n, kind in points:
        lean = mode == "1:N"
        confidence = policy.confidence_1to1 if mode == "1:1" else policy.confidence_1toN
        at = {"population": threshold(population, fmr, n, kind)}
        if model.worst_group:
            at["worst_group"] = threshold(model, fmr, n, kind)
        rates: dict[str, dict] = {}
        for name in members:
            pairs, W = data[name, lean]
            source = model.for_search if lean else model
            fitted = source if name == "all" else source.groups.get(name)
            entry = {}
            for label, t in at.items():
                r = measured_rates(pairs[kind], t, W)
                r["resolved"] = bool(r["impostor_pairs"] * fmr >= MIN_RESOLVED_PAIRS)
                if fitted is not None and (kind == SINGLE or kind in fitted.kinds):
                    tail = fitted.tail_at(t, kind, confidence)
                    r["fmr_model"] = tail["fmr_estimate"]
                    r["fmr_model_upper"] = tail["fmr_upper"]
                    r["beyond_floor"] = bool(fmr < tail["fmr_floor"])
                entry[label] = r
            if "worst_group" in entry:
                entry["fnmr_price"] = entry["worst_group"]["fnmr"] - entry["population"]["fnmr"]
            rates[name] = entry
        overall = rates["all"]["population"]["fmr"]
        for name in model.groups:
            p = rates[name]["population"]
            p["fmr_ratio_to_all"] = p["fmr"] / overall if overall > 0 else None
        rows.append({"mode": mode, "target": target, "comparison_fmr": fmr, "kind": kind,
                     "gallery_size": n, "confidence": confidence, "threshold": at,
                     "rates": rates, "differential": _differential(rates, model.groups)})
    people = {g: int(len(np.unique(identities[of_row == g])))
              for g in sorted(set(groups.values()))}
    return {
        "column": GROUP_COLUMN, "min_people": min_people,
        "people": people, "reported": sorted(model.groups), "not_reported": skipped or {},
        "worst_group": model.worst_group, "group_confidence": model.group_confidence,
        "pairs": "within each group only (both people of the group); label noise left out; "
                 "1:N rows also without the look-alike pairs stated apart",
        "resolved": f"the group holds >= {MIN_RESOLVED_PAIRS} expected impostor pairs at the "
                    "target rate; otherwise the measured rate is a count near zero and the "
                    "group's fitted tail (fmr_model, fmr_model_upper) is the figure",
        "points": rows,
    }


def _differential(rates: dict, groups) -> dict:
    """NIST IR 8280's view at the population threshold: the highest group FMR over the
    lowest, measured (where every group has a false match) and by each group's tail fit."""
    names = list(groups)
    if len(names) < 2:
        return {}
    measured = {g: rates[g]["population"]["fmr"] for g in names}
    model = {g: rates[g]["population"].get("fmr_model") for g in names}
    out: dict[str, Any] = {"highest_fmr": max(measured, key=lambda g: measured[g])}
    lo = min(measured.values())
    out["max_over_min_measured"] = max(measured.values()) / lo if lo > 0 else None
    if all(v is not None and v > 0 for v in model.values()):
        out["max_over_min_model"] = max(model.values()) / min(model.values())
    return out


