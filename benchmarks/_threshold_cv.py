"""Which way of deriving a 1:N threshold holds on people the calibration never saw?

Identity-disjoint cross-validation on lfw-dev (issue 18, item 1). Each split draws half of
the people as the calibration half and keeps the other half for evaluation. Every candidate
method turns the calibration half into a threshold function (matcher.calibrate's own fit,
the same code ``matcher calibrate`` runs); the evaluation half then runs the open-set
protocol under the service's decision rule (threshold from FPIR / N, margin):

* people with two or more photos are split at random into booked and never-booked;
* a booked person is enrolled with one photo, or (two-photo booking) with the fused
  template of two photos where three or more exist; their other photos are mated probes;
* every photo of a never-booked person is a non-mated probe;
* people with one photo are distractors: enrolled, never a probe.

The gallery is cut to N travellers (booked and distractors drawn alike) at each size.
Counts are pooled over the splits; FPIR has an exact (Clopper-Pearson) interval. Probes of
one person are not independent, so the FNIR interval, binomial too, is a floor on the
uncertainty, not its measure.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from matcher.calibrate.fit import fit_population, fit_score_model
from matcher.calibrate.noise import label_noise
from matcher.calibrate.pairs import (
    FUSED_BOOKING_PHOTOS,
    PairScores,
    drop_identity_pairs,
    fused_pairs,
    raw_kind_pairs,
    score_pairs,
)
from matcher.gallery.decision import DecisionPolicy
from matcher.gallery.scoremodel import FUSED, SINGLE, ScoreModel
from matcher.templates import fuse_templates

from ._binomial import clopper_pearson

SIZES = (250, 500, 1_000)       # plus the largest gallery a half allows
CONFIDENCES = (0.5, 0.75, 0.9, 0.95)
# The shipped targets, the policy a run is measured at unless it names another. Frozen,
# so one instance can be every call's default.
SHIPPED_POLICY = DecisionPolicy()


# -- the candidate methods ------------------------------------------------------------

def per_person(pairs: PairScores) -> PairScores:
    """The tail counted in pairs of people: each pair of identities keeps its best score,
    once, out of as many pairs as there are pairs of people."""
    a = np.minimum(pairs.tail_a, pairs.tail_b) if pairs.fused_per_identity is None \
        else pairs.tail_a
    b = np.maximum(pairs.tail_a, pairs.tail_b) if pairs.fused_per_identity is None \
        else pairs.tail_b
    order = np.lexsort((-pairs.tail, b, a))
    a, b, s = a[order], b[order], pairs.tail[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    photos = (pairs.photos_per_identity > 0).astype(np.int64)
    scale = pairs.identity_pairs / max(pairs.impostor_pairs, 1)
    return replace(pairs, photos_per_identity=photos, tail=s[first], tail_a=a[first],
                   tail_b=b[first],
                   histogram=np.round(pairs.histogram * scale).astype(np.int64))


@dataclass
class Calibrated:
    """One calibration half's threshold functions: method name -> (fmr -> threshold)."""

    methods: dict


def shipped_fit(templates: np.ndarray, identities: np.ndarray, bootstrap: int, seed: int
                ) -> tuple[ScoreModel, list[dict], dict]:
    """What ``matcher calibrate`` makes of these rows (matcher.calibrate.fit.fit_population;
    label noise by names only: no photo evidence in a CV half): (model, label noise
    dropped, the rows' raw_kind_pairs)."""
    raw = raw_kind_pairs(templates, identities)
    floor = float(np.quantile(raw[SINGLE].genuine, 0.05))
    noise = label_noise(raw[SINGLE], floor)
    model = fit_population(templates, identities, "cv", "cv", dropped=noise["dropped"],
                           apart=noise["look_alikes"], raw=raw, bootstrap=bootstrap,
                           seed=seed)
    return model, noise["dropped"], raw


def calibrate_half(templates: np.ndarray, identities: np.ndarray, bootstrap: int, seed: int
                   ) -> tuple[Calibrated, ScoreModel]:
    """Every candidate method, calibrated on one half; and the model ``matcher calibrate``
    makes of it (label noise dropped; 1:N from the fit with look-alikes apart), for the
    1:1 check."""
    shipped, dropped, raw = shipped_fit(templates, identities, bootstrap, seed)
    kept, lean = replace(shipped, search=None), shipped.for_search
    methods = {}
    for label, model in (("look-alikes in", kept), ("look-alikes apart", lean)):
        methods[f"{label}: estimate"] = model.threshold_estimate
        methods[f"{label}: estimate, single photos only"] = \
            replace(model, kinds={}).threshold_estimate
        for c in CONFIDENCES:
            methods[f"{label}: bound {c:.0%}"] = (
                lambda f, c=c, m=model: m.threshold_at_fmr(f, c))
    # The tail counted in pairs of people (look-alikes in: they are what it tames).
    kinds = [fit_score_model(per_person(drop_identity_pairs(raw[k], dropped)), "cv", "cv",
                             bootstrap=bootstrap, seed=seed) for k in (SINGLE, FUSED)]
    people = replace(kinds[0], kinds={FUSED: kinds[1]})
    methods["people: estimate"] = people.threshold_estimate
    methods["people: bound 95%"] = (lambda f: people.threshold_at_fmr(f, 0.95))
    return Calibrated(methods), shipped


def one_to_one(model: ScoreModel, templates: np.ndarray, identities: np.ndarray,
               policy: DecisionPolicy) -> list[dict]:
    """The 1:1 rule on an evaluation half: each booking kind at its own threshold."""
    out = []
    for kind, pairs in ((SINGLE, score_pairs(templates, identities)),
                        (FUSED, fused_pairs(templates, identities))):
        t = max(policy.min_threshold,
                model.threshold_at_fmr(policy.fmr_1to1, policy.confidence_1to1, kind))
        out.append({"kind": kind, "threshold": t,
                    "false_matches": int((pairs.tail >= t).sum()),
                    "impostor_pairs": pairs.impostor_pairs,
                    "misses": int((pairs.genuine < t).sum()),
                    "genuine_pairs": int(len(pairs.genuine))})
    return out


# -- the evaluation half --------------------------------------------------------------

@dataclass
class Gallery:
    templates: np.ndarray   # (g, 512): one per traveller
    person: np.ndarray      # (g,)
    booked: np.ndarray      # (g,) bool: a booked traveller (else a distractor)


@dataclass
class Probes:
    templates: np.ndarray
    person: np.ndarray
    mated: np.ndarray       # (p,) bool


FRAMES = ("one photo", "two photos", "photo + jittered copy")


def open_set(templates: np.ndarray, person: np.ndarray, bookings: int,
             rng: np.random.Generator, frames: str = FRAMES[0],
             jittered: np.ndarray | None = None) -> tuple[Gallery, Probes]:
    """The protocol of the module docstring over one evaluation half (rows in label order,
    at most MAX_PHOTOS_PER_PERSON a person). People are the unit: each booked person probes
    once (one of their other photos, drawn at random) and each never-booked person once,
    so a family of look-alikes with many photos weighs what any other person weighs.

    ``frames``: what one probe is made of: one photo; two different photos of the person
    fused (where they have two to spare); or one photo fused with ``jittered`` (n, 512),
    the template of a shifted, scaled, re-lit copy of it (NaN rows: no face found there).
    The random draws are the same whatever ``frames`` is, so the variants pair up.
    """
    people, counts = np.unique(person, return_counts=True)
    multi = rng.permutation(people[counts >= 2])
    booked = set(multi[: len(multi) // 2].tolist())
    g_t, g_p, g_b, probes, p_person = [], [], [], [], []

    def probe(rows: np.ndarray) -> np.ndarray:
        order = rng.permutation(rows)
        first = templates[order[0]]
        if frames == FRAMES[1] and len(order) >= 2:
            return fuse_templates(templates[order[:2]])
        if frames == FRAMES[2] and jittered is not None and np.isfinite(jittered[order[0], 0]):
            return fuse_templates(np.stack([first, jittered[order[0]]]))
        return first

    for who, n in zip(people.tolist(), counts.tolist(), strict=True):
        rows = np.flatnonzero(person == who)
        if n == 1:
            g_t.append(templates[rows[0]]), g_p.append(who), g_b.append(False)
        elif who in booked:
            k = bookings if n > bookings else 1
            g_t.append(fuse_templates(templates[rows[:k]])), g_p.append(who), g_b.append(True)
            probes.append(probe(rows[k:])), p_person.append(who)
        else:
            probes.append(probe(rows)), p_person.append(who)
    gallery = Gallery(np.stack(g_t), np.asarray(g_p), np.asarray(g_b))
    p_person = np.asarray(p_person)
    return gallery, Probes(np.stack(probes), p_person, np.isin(p_person, list(booked)))


def _top2(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 score, its column, top-2 score) of each row."""
    if scores.shape[1] == 1:
        return scores[:, 0], np.zeros(len(scores), np.int64), np.full(len(scores), -np.inf)
    top = np.argpartition(-scores, 1, axis=1)[:, :2]
    pair = np.take_along_axis(scores, top, 1)
    first = np.argmax(pair, axis=1)
    rows = np.arange(len(scores))
    return pair[rows, first], top[rows, first], pair[rows, 1 - first]


def evaluate(calibrated: Calibrated, gallery: Gallery, probes: Probes, sizes: list[int],
             policy: DecisionPolicy, rng: np.random.Generator) -> list[dict]:
    """Counts per (method, N): false positives among non-mated probes, misses among mated."""
    scores = probes.templates @ gallery.templates.T
    rows = []
    for n in sizes:
        cols = np.sort(rng.choice(len(gallery.person), size=n, replace=False))
        top1, at, top2 = _top2(scores[:, cols])
        who = gallery.person[cols][at]
        in_gallery = np.isin(probes.person, gallery.person[cols])
        mated = probes.mated & in_gallery
        nonmated = ~probes.mated
        for name, threshold_at in calibrated.methods.items():
            t = max(policy.min_threshold, threshold_at(policy.fpir_1toN / n))
            match = (top1 >= t) & (top1 - top2 >= policy.margin)
            false = np.flatnonzero(match & nonmated)
            rows.append({"method": name, "n": n, "threshold": t,
                         "false_matches": [(int(probes.person[i]), int(who[i]),
                                            round(float(top1[i]), 4)) for i in false],
                         "false_positives": int((match & nonmated).sum()),
                         "nonmated": int(nonmated.sum()),
                         "misses": int((~(match & (who == probes.person)) & mated).sum()),
                         "mated": int(mated.sum()),
                         "wrong_traveller": int((match & (who != probes.person) & mated).sum())})
    return rows


# -- the whole cross-validation -------------------------------------------------------

def pooled(rows: list[dict], families: set[frozenset] = frozenset()) -> list[dict]:
    """Sum the counts of every split per (bookings, method, size label). False matches
    between the two people of a look-alike pair in ``families`` are counted apart."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["bookings"], r["method"], r["size"])
        acc = out.setdefault(key, {"bookings": r["bookings"], "method": r["method"],
                                   "size": r["size"], "n": [], "threshold": [],
                                   "false_positives": 0, "nonmated": 0, "misses": 0,
                                   "mated": 0, "wrong_traveller": 0,
                                   "false_matches": {}, "look_alike_false_positives": 0})
        for a, w, score in r["false_matches"]:
            acc["look_alike_false_positives"] += frozenset((a, w)) in families
            pair = " / ".join(sorted((a, w)))
            seen = acc["false_matches"].setdefault(pair, [0, 0.0])
            seen[0] += 1
            seen[1] = max(seen[1], score)
        for f in ("false_positives", "nonmated", "misses", "mated", "wrong_traveller"):
            acc[f] += r[f]
        acc["n"].append(r["n"])
        acc["threshold"].append(r["threshold"])
    for acc in out.values():
        acc["fpir"] = acc["false_positives"] / max(acc["nonmated"], 1)
        acc["fpir_ci"] = clopper_pearson(acc["false_positives"], acc["nonmated"])
        others = acc["false_positives"] - acc["look_alike_false_positives"]
        acc["fpir_without_look_alikes"] = others / max(acc["nonmated"], 1)
        acc["fpir_without_look_alikes_ci"] = clopper_pearson(others, acc["nonmated"])
        acc["fnir"] = acc["misses"] / max(acc["mated"], 1)
        acc["fnir_ci"] = clopper_pearson(acc["misses"], acc["mated"])
        acc["n"] = float(np.mean(acc["n"]))
        acc["threshold"] = float(np.mean(acc["threshold"]))
    return list(out.values())


def cross_validate(templates: np.ndarray, identities: np.ndarray, drop: list[dict], *,
                   splits: int = 100, bootstrap: int = 200, seed: int = 0,
                   policy: DecisionPolicy = SHIPPED_POLICY,
                   bookings: tuple[int, ...] = (1, FUSED_BOOKING_PHOTOS)) -> dict:
    """Rows of usable photos (at most MAX_PHOTOS_PER_PERSON a person, label order) ->
    {"rows": per split, "pooled": per method, "choice": the method to ship}.

    ``drop``: label noise found by matcher calibrate (one person under two names): left out
    of calibration pairs as calibrate does, and one identity in the evaluation.
    """
    identities = np.asarray(identities).copy()
    for d in drop:
        identities[identities == d["b"]] = d["a"]
    names = np.unique(identities)
    rng = np.random.default_rng(seed)
    rows, verify = [], []
    for split in range(splits):
        half = rng.permutation(names)
        calib = np.isin(identities, half[: len(half) // 2])
        calibrated, model = calibrate_half(templates[calib], identities[calib], bootstrap,
                                           seed + split)
        for r in one_to_one(model, templates[~calib], identities[~calib], policy):
            verify.append({**r, "split": split})
        person = np.searchsorted(names, identities[~calib])
        for b in bookings:
            gallery, probes = open_set(templates[~calib], person, b, rng)
            largest = len(gallery.person)
            sizes = [n for n in SIZES if n < largest] + [largest]
            for r in evaluate(calibrated, gallery, probes, sizes, policy, rng):
                r["false_matches"] = [(str(names[a]), str(names[w]), s)
                                      for a, w, s in r["false_matches"]]
                r.update(split=split, bookings=b,
                         size=str(r["n"]) if r["n"] in SIZES else "max")
                rows.append(r)
    # Look-alike pairs of the whole set, by calibrate's rule: only to count their false
    # matches apart in the evaluation (each half's calibration finds its own).
    pairs = score_pairs(templates, identities)
    floor = float(np.quantile(pairs.genuine, 0.05))
    found = label_noise(pairs, floor)["look_alikes"]
    families = {frozenset((d["a"], d["b"])) for d in found}
    table = pooled(rows, families)
    return {"rows": rows, "pooled": table, "look_alikes": found,
            "one_to_one": pooled_verification(verify),
            "choice": choose(table, policy.fpir_1toN)}


def pooled_verification(rows: list[dict]) -> list[dict]:
    out = []
    for kind in (SINGLE, FUSED):
        rs = [r for r in rows if r["kind"] == kind]
        fm, imp = sum(r["false_matches"] for r in rs), sum(r["impostor_pairs"] for r in rs)
        miss, gen = sum(r["misses"] for r in rs), sum(r["genuine_pairs"] for r in rs)
        out.append({"kind": kind, "threshold": float(np.mean([r["threshold"] for r in rs])),
                    "fmr": fm / max(imp, 1), "false_matches": fm, "impostor_pairs": imp,
                    "fnmr": miss / max(gen, 1), "fnmr_ci": clopper_pearson(miss, gen),
                    "misses": miss, "genuine_pairs": gen})
    return out


def choose(table: list[dict], target: float) -> dict:
    """The method whose pooled FPIR is at or under ``target`` at every N and booking, with
    the lowest mean FNIR; and why the others were not chosen."""
    by_method: dict[str, list[dict]] = {}
    for r in table:
        by_method.setdefault(r["method"], []).append(r)
    verdicts = {}
    for method, rs in by_method.items():
        worst = max(rs, key=lambda r: r["fpir_without_look_alikes"])
        verdicts[method] = {"holds": worst["fpir_without_look_alikes"] <= target,
                            "worst_fpir": worst["fpir_without_look_alikes"],
                            "worst_at": worst["size"],
                            "worst_fpir_with_look_alikes": max(r["fpir"] for r in rs),
                            "mean_fnir": float(np.mean([r["fnir"] for r in rs]))}
    holding = [m for m, v in verdicts.items() if v["holds"]]
    best = min(holding, key=lambda m: verdicts[m]["mean_fnir"]) if holding else None
    return {"method": best, "verdicts": verdicts}
