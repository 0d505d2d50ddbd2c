"""The score model fitted to scored pairs: the impostor tail (empirical, then a GPD past
the data's resolution), the genuine curve, identity-bootstrap replicates, and a model
for each comparison kind (matcher/gallery/scoremodel.py says how they become thresholds)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import InvalidInput
from ..gallery.scoremodel import FUSED, SINGLE, ScoreModel, gpd_fit
from .pairs import (
    FUSED_BOOKING_PHOTOS,
    MAX_PHOTOS_PER_PERSON,
    TAIL_KEEP_SCORE,
    PairScores,
    kind_pairs,
    raw_kind_pairs,
)

TAIL_FMR = 1e-4          # the GPD is fitted to the top 1e-4 of impostor pairs ...
MIN_EXCEEDANCES = 200    # ... or to the top 200 pairs where the set is small
BOOTSTRAP = 200
MIN_RESOLVED_PAIRS = 3   # the empirical bound is used down to 3 expected pairs above it
CONFIDENCE = 0.95
# The empirical tail resolves rates down to about one identity pair in all; the fitted
# tail is trusted one decade beyond that and no further.
EXTRAPOLATION_DECADES = 1.0


def tail_fit(tail_desc: np.ndarray, pair_weight: np.ndarray, total: float,
              tail_fmr: float) -> tuple[float, float, float]:
    """(u, xi, sigma): u is where ``tail_fmr`` of ``total`` pairs lie above."""
    cum = np.cumsum(pair_weight)
    need = tail_fmr * total
    if cum[-1] <= need:
        raise InvalidInput("too few high impostor scores kept for the tail fit")
    k = int(np.searchsorted(cum, need))
    u = float(tail_desc[k])
    above = tail_desc[:k]
    xi, sigma = gpd_fit(above - u, pair_weight[:k])
    return u, xi, sigma


def fit_score_model(pairs: PairScores, model_id: str, settings_hash: str, *,
                    bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE,
                    seed: int = 0, document: dict | None = None):
    """Fit a ScoreModel (see matcher/gallery/scoremodel.py) to scored pairs."""
    m = len(pairs.photos_per_identity)
    total = pairs.impostor_total(np.ones(m))
    if total < MIN_EXCEEDANCES * 10 or len(pairs.genuine) < 10:
        raise InvalidInput(f"too little data to calibrate: {total:.0f} impostor pairs, "
                           f"{len(pairs.genuine)} genuine pairs")
    tail_fmr = max(TAIL_FMR, MIN_EXCEEDANCES / total)
    order = np.argsort(-pairs.tail)
    tail_desc = pairs.tail[order].astype(np.float64)
    ta, tb = pairs.tail_a[order], pairs.tail_b[order]
    point = tail_fit(tail_desc, np.ones(len(tail_desc)), total, tail_fmr)

    rng = np.random.default_rng(seed)
    g_order = np.argsort(pairs.genuine)
    g_sorted = pairs.genuine[g_order].astype(np.float64)
    g_id = pairs.genuine_identity[g_order]
    grid = np.round(np.arange(-0.2, 1.0001, 0.005), 3)
    cut = np.searchsorted(g_sorted, grid, side="left")   # genuine pairs below each score

    def fnmr_curve(weights: np.ndarray) -> np.ndarray:
        w = weights[g_id]
        cum = np.concatenate([[0.0], np.cumsum(w)])
        return cum[cut] / max(cum[-1], 1e-12)

    # Rates the data resolves on its own: down to a few expected pairs above the threshold.
    resolved = np.geomspace(tail_fmr, MIN_RESOLVED_PAIRS / total, 40)
    replicates: list[tuple[float, float, float]] = []
    curve_rows: list[np.ndarray] = []
    threshold_rows: list[np.ndarray] = []
    for _ in range(bootstrap):
        w = rng.multinomial(m, np.full(m, 1.0 / m)).astype(np.float64)
        pair_weight = w[ta] * w[tb]
        total_b = pairs.impostor_total(w)
        try:
            replicates.append(tail_fit(tail_desc, pair_weight, total_b, tail_fmr))
        except InvalidInput:
            continue  # a resample with too few high pairs: skip rather than bias
        curve_rows.append(fnmr_curve(w))
        cum = np.cumsum(pair_weight)
        at = np.minimum(np.searchsorted(cum, resolved * total_b), len(tail_desc) - 1)
        threshold_rows.append(tail_desc[at])
    curves = np.asarray(curve_rows)
    # A few look-alike people with many photos each make clusters of high pairs that a
    # smooth tail can miss; where the data resolves a rate, its own bound counts too
    # (every resample is kept, so a threshold can take any confidence level).
    empirical_thresholds = np.asarray(threshold_rows)
    lo, hi = np.quantile(curves, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    genuine = np.column_stack([grid, fnmr_curve(np.ones(m)), lo, hi])

    # Empirical exceedance curve: the histogram for the bulk, exact pairs in the tail.
    edges, hist = pairs.bin_edges, pairs.histogram
    above = hist[::-1].cumsum()[::-1]        # pairs in bins >= i
    bulk = [(float(edges[i]), float(above[i] / total))
            for i in range(0, len(hist), 10)
            if above[i] > 0 and edges[i] < TAIL_KEEP_SCORE]
    ranks = np.unique(np.geomspace(1, len(tail_desc), 300).astype(int)) - 1
    exact = [(float(tail_desc[r]), float((r + 1) / total)) for r in ranks[::-1]]
    empirical = np.asarray(bulk + exact)

    floor = 1.0 / (pairs.identity_pairs * 10 ** EXTRAPOLATION_DECADES)
    doc = dict(document or {})
    doc.setdefault("method", {}).update({
        "pairs": f"every pair of usable photos, at most {MAX_PHOTOS_PER_PERSON} per person",
        "tail": f"GPD (Zhang-Stephens) fitted to the top {tail_fmr:.3g} of impostor pairs",
        "bootstrap": f"{len(replicates)} resamples of identities (seed {seed})",
        "threshold": f"the {confidence:.0%} upper bound over the resamples, of the "
                     "fitted tail and, where the data resolves the rate (>= "
                     f"{MIN_RESOLVED_PAIRS} pairs), of the empirical tail: the larger",
        "fmr_floor": f"1 / (impostor identity pairs x 10^{EXTRAPOLATION_DECADES:g})",
        "one_to_many": "per-comparison FMR = FPIR / N (union bound; holds for dependent "
                       "comparisons)",
    })
    doc["impostor_summary"] = {
        "pairs": int(total), "identity_pairs": pairs.identity_pairs,
        "mean": float(((edges[:-1] + edges[1:]) / 2 * hist).sum() / total),
        "max": float(tail_desc[0]) if len(tail_desc) else None}
    doc["genuine_summary"] = {
        "pairs": int(len(g_sorted)),
        "identities": int(len(np.unique(pairs.genuine_identity))),
        "quantiles": {str(q): round(float(np.quantile(g_sorted, q)), 4)
                      for q in (0.001, 0.01, 0.05, 0.5)}}
    return ScoreModel(model_id, settings_hash, confidence, tail_fmr, point,
                      np.asarray(replicates), floor, empirical, genuine, doc, resolved,
                      empirical_thresholds)


def fit_with_kinds(templates: np.ndarray, identities: np.ndarray, model_id: str,
                   settings_hash: str, *, drop: Sequence[dict] = (), bootstrap: int = BOOTSTRAP,
                   confidence: float = CONFIDENCE, seed: int = 0, document: dict | None = None,
                   fused_optional: bool = False, raw: dict[str, PairScores] | None = None):
    """The score model of every comparison the service makes: one capture against one
    booking photo, and (kind ``fused``) against a traveller's fused booking photos.
    templates (n, 512) of the capped usable rows; ``drop``: label noise (label_noise).
    ``fused_optional``: data too thin for a fused tail gives a model without that kind
    (said in its method) instead of an error (a small demographic group). ``raw``: the
    rows' raw_kind_pairs, when the caller has scored them already."""
    pairs = kind_pairs(templates, identities, list(drop), raw)
    model = fit_score_model(pairs[SINGLE], model_id, settings_hash, bootstrap=bootstrap,
                            confidence=confidence, seed=seed, document=document)
    try:
        fused_model = fit_score_model(
            pairs[FUSED], model_id, settings_hash, bootstrap=bootstrap, confidence=confidence,
            seed=seed, document={"method": {
                "pairs": f"the fused template of each person's first {FUSED_BOOKING_PHOTOS} "
                         "photos against every other photo"}})
    except InvalidInput as exc:
        if not fused_optional:
            raise
        model.document.setdefault("method", {})["kinds"] = f"no fused comparisons: {exc}"
        return model
    model.document.setdefault("method", {})["kinds"] = (
        "every threshold and rate is the worst of the single-photo model and the models in "
        "'kinds' (fused: a traveller's fused booking photos against one capture)")
    return replace(model, kinds={"fused": fused_model})


def fit_population(templates: np.ndarray, identities: np.ndarray, model_id: str,
                   settings_hash: str, *, dropped: list[dict], apart: list[dict],
                   raw: dict[str, PairScores] | None = None, bootstrap: int = BOOTSTRAP,
                   seed: int = 0, document: dict | None = None):
    """The population's model as ``matcher calibrate`` makes it: label noise ``dropped``;
    1:1 with the look-alikes in, and (``search``) 1:N with the ``apart`` pairs left out."""
    raw = raw if raw is not None else raw_kind_pairs(templates, identities)
    model = fit_with_kinds(templates, identities, model_id, settings_hash, drop=dropped,
                           bootstrap=bootstrap, seed=seed, document=document, raw=raw)
    if not apart:
        return model
    search = fit_with_kinds(templates, identities, model_id, settings_hash,
                            drop=dropped + apart, bootstrap=bootstrap, seed=seed, raw=raw,
                            document={"method": {
                                "look_alikes": f"{len(apart)} look-alike identity pairs "
                                               "(source.look_alikes_apart) left out"}})
    return replace(model, search=search)


