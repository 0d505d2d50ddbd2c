"""lfw-dev for the accuracy suite: templates, identity bootstrap, 1:1 error rates, LFW pairs.

Every statistic is computed under a matrix of identity weights ``W`` (R, m): row 0 is all
ones (the point estimate), rows 1.. are multinomial resamples of the m identities, so a
person drawn twice counts twice everywhere (their genuine pairs, their impostor pairs,
their probes). That is the bootstrap of matcher.calibrate.fit.fit_score_model, applied to the
figures the benchmark reports: people, not photos, are the unit that varies.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

# tail_fit is calibrate's own peaks-over-threshold fit: refitting it per resample here
# is the same method, not a second copy of it
from matcher.calibrate.embedding import Embedded, embed_folder, read_labels
from matcher.calibrate.fit import MIN_EXCEEDANCES, TAIL_FMR, tail_fit
from matcher.calibrate.pairs import (
    MAX_PHOTOS_PER_PERSON,
    TAIL_KEEP_SCORE,
    PairScores,
    pair_scores_for,
)
from matcher.face.models import default_pack
from matcher.face.pipeline import Pipeline
from matcher.gallery.decision import DecisionPolicy
from matcher.gallery.scoremodel import ScoreModel, gpd_isf, load_score_model

from .harness import Report

CACHE = Path.home() / ".cache" / "matcher"
QUICK_IDENTITIES = 600
SEED = 0
CONFIDENCE = 0.95


# -- templates ------------------------------------------------------------------------

def embedded_lfw(folder: Path, pipeline: Pipeline, quick: bool) -> Embedded:
    """lfw-dev (or its quick subset) through ``pipeline``, cached per labels and settings."""
    if quick:
        folder = quick_subset(folder)
    return embed_folder(folder, pipeline, cache_dir=CACHE / "calibrate", progress=True)


def quick_subset(folder: Path, identities: int = QUICK_IDENTITIES) -> Path:
    """A folder of ``identities`` people drawn with a fixed seed, at most 10 photos each.

    It holds only a labels.csv and a symlink to the images, so its paths are lfw-dev's and
    embed_folder caches it under its own labels hash.
    """
    rows = read_labels(folder)
    names = np.unique([who for _, who in rows])
    chosen = set(np.random.default_rng(SEED).permutation(names)[:identities].tolist())
    taken: dict[str, int] = {}
    keep = []
    for file, who in rows:
        if who in chosen and taken.get(who, 0) < MAX_PHOTOS_PER_PERSON:
            taken[who] = taken.get(who, 0) + 1
            keep.append((file, who))
    tag = hashlib.sha256(repr(keep).encode()).hexdigest()[:12]
    sub = CACHE / "bench" / f"lfw-dev-quick-{tag}"
    sub.mkdir(parents=True, exist_ok=True)
    images = sub / "images"
    if not images.exists():
        images.symlink_to(Path(folder).resolve() / "images")
    with open(sub / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "identity"), *keep])
    return sub


def merge_label_noise(embedded: Embedded, model: ScoreModel) -> tuple[Embedded, list[str]]:
    """One person filed under two names (found by matcher calibrate, listed in the shipped
    score model) is one identity here, so their pairs count as genuine, not as false
    matches. Returns the relabelled set and what was merged."""
    dropped = model.document.get("source", {}).get("label_noise_dropped", [])
    identities = embedded.identities.copy()
    merged = []
    for d in dropped:
        identities[identities == d["b"]] = d["a"]
        merged.append(f"{d['b']} -> {d['a']} ({d['evidence']})")
    return dataclasses.replace(embedded, identities=identities), merged


# -- the identity bootstrap -----------------------------------------------------------

def identity_weights(m: int, replicates: int, seed: int = SEED) -> np.ndarray:
    """(replicates + 1, m) float64: row 0 all ones, then multinomial resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(m, np.full(m, 1.0 / m), size=replicates).astype(np.float64)
    return np.vstack([np.ones((1, m)), draws])


def with_ci(values: np.ndarray) -> dict:
    """{"point", "lo", "hi"} of one statistic over the rows of identity_weights."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.nanquantile(values[1:], [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {"point": float(values[0]), "lo": float(lo), "hi": float(hi)}


# -- 1:1 error rates ------------------------------------------------------------------

class Verification:
    """FMR and FNMR of one PairScores under identity weights.

    Impostor pairs are known one by one only above TAIL_KEEP_SCORE (matcher.calibrate keeps
    the bulk as a histogram), so FMRs are computed there: every threshold that matters for
    1:1 or 1:N lies far above it.
    """

    def __init__(self, pairs: PairScores, names: np.ndarray) -> None:
        # pairs index its own identity_names; map them onto the suite-wide ``names``
        to_global = np.searchsorted(names, pairs.identity_names)
        self.pairs = pairs
        order = np.argsort(-pairs.tail, kind="stable")
        self.tail_desc = pairs.tail[order].astype(np.float64)
        self.ta = to_global[pairs.tail_a[order]]
        self.tb = to_global[pairs.tail_b[order]]
        g = np.argsort(pairs.genuine, kind="stable")
        self.genuine = pairs.genuine[g].astype(np.float64)
        self.genuine_id = to_global[pairs.genuine_identity[g]]
        self.photos = np.zeros(len(names))
        self.photos[to_global] = pairs.photos_per_identity

    def impostor_total(self, W: np.ndarray) -> np.ndarray:
        """(R,) impostor pairs when identity i counts W[r, i] times (copies never pair)."""
        per = W * self.photos
        return (per.sum(1) ** 2 - (per ** 2).sum(1)) / 2.0

    def fmr(self, threshold: float, W: np.ndarray) -> np.ndarray:
        """(R,) fraction of impostor pairs scoring >= threshold."""
        if threshold < TAIL_KEEP_SCORE:
            raise ValueError(f"FMR is resolved above {TAIL_KEEP_SCORE}, got {threshold}")
        k = int(np.searchsorted(-self.tail_desc, -threshold, side="right"))
        above = (W[:, self.ta[:k]] * W[:, self.tb[:k]]).sum(axis=1)
        return above / self.impostor_total(W)

    def fnmr(self, thresholds: np.ndarray | float, W: np.ndarray) -> np.ndarray:
        """FNMR at one threshold, or at per-replicate thresholds (R,) or (R, k)."""
        t = np.asarray(thresholds, dtype=np.float64)
        shape = t.shape if t.ndim else (len(W),)
        t = np.broadcast_to(t, shape).reshape(len(W), -1)
        cum = np.concatenate([np.zeros((len(W), 1)), np.cumsum(W[:, self.genuine_id], 1)], 1)
        below = np.take_along_axis(cum, np.searchsorted(self.genuine, t, side="left"), 1)
        return (below / cum[:, -1:]).reshape(shape)

    def thresholds_at_fmr(self, fmrs: np.ndarray, W: np.ndarray) -> np.ndarray:
        """(R, k) empirical thresholds: the lowest score with FMR <= each of ``fmrs``.

        NaN where a rate lies below one impostor pair or above the kept tail."""
        totals = self.impostor_total(W)
        out = np.full((len(W), len(fmrs)), np.nan)
        for r, w in enumerate(W):  # one pass over the kept tail per replicate
            cum = np.cumsum(w[self.ta] * w[self.tb])
            need = np.asarray(fmrs) * totals[r]
            k = np.searchsorted(cum, need, side="right")  # pairs that may stay above
            ok = (need >= 1.0) & (k < len(cum))
            out[r, ok] = self.tail_desc[k[ok]] + 1e-7     # just above the first one excluded
        return out

    def gpd_thresholds(self, fmr: float, W: np.ndarray) -> np.ndarray:
        """(R,) thresholds at ``fmr`` from a GPD tail refitted per replicate, exactly as
        matcher.calibrate.fit.fit_score_model fits it (top TAIL_FMR of impostor pairs)."""
        totals = self.impostor_total(W)
        tail_fmr = max(TAIL_FMR, MIN_EXCEEDANCES / totals[0])
        out = np.empty(len(W))
        for r, w in enumerate(W):
            u, xi, sigma = tail_fit(self.tail_desc, w[self.ta] * w[self.tb], totals[r],
                                     tail_fmr)
            out[r] = min(1.0, u + float(gpd_isf(fmr / tail_fmr, xi, sigma)))
        return out


def det_band(ver: Verification, W: np.ndarray, points: int = 40) -> dict:
    """DET curve with its CI: FNMR (point, lo, hi) at FMRs from 10 impostor pairs to 1e-1."""
    lowest = 10.0 / ver.impostor_total(W[:1])[0]
    fmrs = np.geomspace(lowest, 1e-1, points)
    thresholds = ver.thresholds_at_fmr(fmrs, W)
    fnmr = ver.fnmr(np.nan_to_num(thresholds, nan=1.0), W)
    fnmr[np.isnan(thresholds)] = np.nan
    keep = ~np.isnan(fnmr[0])
    # a resample with fewer impostor pairs may not reach the lowest rates: those drop out
    lo, hi = np.nanquantile(fnmr[1:, keep], [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2],
                            axis=0)
    return {"fmr": fmrs[keep], "fnmr": fnmr[0][keep], "lo": lo, "hi": hi,
            "threshold": thresholds[0][keep]}


def genuine_rows(identities: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) row indices of every genuine pair among ``rows`` (each pair once)."""
    ids = identities[rows]
    same = np.triu(ids[:, None] == ids[None, :], k=1)
    a, b = np.nonzero(same)
    return rows[a], rows[b]


# -- LFW's pairs.txt ------------------------------------------------------------------

def read_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(file_a, file_b, same, fold) of pairs.txt, with folds recovered from file order.

    LFW lists each fold as its matched pairs then its mismatched pairs; this half drops the
    pairs of held-back people, so folds are uneven but still one run of matched lines and
    one of mismatched lines each: a new fold starts where a matched line follows a
    mismatched one.
    """
    def name(who: str, n: str) -> str:
        return f"images/{who}/{who}_{int(n):04d}.jpg"

    a, b, same = [], [], []
    for line in (Path(folder) / "pairs.txt").read_text().splitlines():
        f = line.split("\t")
        if len(f) == 3:
            a.append(name(f[0], f[1])), b.append(name(f[0], f[2])), same.append(True)
        elif len(f) == 4:
            a.append(name(f[0], f[1])), b.append(name(f[2], f[3])), same.append(False)
    same = np.array(same)
    fold = np.concatenate([[0], np.cumsum(same[1:] & ~same[:-1])])
    return np.array(a), np.array(b), same, fold


def rows_of(embedded: Embedded, files: np.ndarray) -> np.ndarray:
    """Row index of each file (every file must be one of ``embedded.files``)."""
    order = np.argsort(embedded.files)
    pos = np.searchsorted(embedded.files[order], files)
    rows = order[np.minimum(pos, len(order) - 1)]
    if not np.array_equal(embedded.files[rows], files):
        raise ValueError("a pair names a photo that is not in the embedded set")
    return rows


def pair_templates_scores(embedded: Embedded, file_a: np.ndarray, file_b: np.ndarray,
                          quality_gate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores, failed): cosine of each pair; -1 where a photo has no usable template."""
    ia, ib = rows_of(embedded, file_a), rows_of(embedded, file_b)
    usable = embedded.usable(quality_gate)
    failed = ~(usable[ia] & usable[ib])
    scores = np.full(len(ia), -1.0)
    ok = ~failed
    scores[ok] = np.einsum("ij,ij->i", embedded.templates[ia[ok]].astype(np.float64),
                           embedded.templates[ib[ok]].astype(np.float64))
    return scores, failed


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same iff score > t" on these pairs."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    # with t between s[i-1] and s[i]: pairs 0..i-1 called different, i.. called same
    correct = np.r_[0, np.cumsum(~y)] + np.r_[y.sum(), y.sum() - np.cumsum(y)]
    i = int(np.argmax(correct))
    lower = s[i - 1] if i > 0 else s[0] - 1e-6
    upper = s[i] if i < len(s) else s[-1] + 1e-6
    return float((lower + upper) / 2)


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, fold: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy per fold, threshold per fold): each fold judged at the threshold best on
    the other nine (LFW's unrestricted protocol, no training on the test fold)."""
    folds = np.unique(fold)
    acc, thr = np.empty(len(folds)), np.empty(len(folds))
    for k, f in enumerate(folds):
        test = fold == f
        thr[k] = best_threshold(scores[~test], same[~test])
        acc[k] = ((scores[test] > thr[k]) == same[test]).mean()
    return acc, thr


# -- one run of the suite over lfw-dev ----------------------------------------------

@dataclasses.dataclass
class Lfw:
    """One lfw-dev run: templates, people and the bootstrap shared by every figure."""

    folder: Path
    quick: bool
    embedded: Embedded
    names: np.ndarray        # (m,) identities after merging label noise, sorted
    person: np.ndarray       # (n,) identity index of each row
    W: np.ndarray            # (R, m) identity weights, row 0 all ones
    model: ScoreModel
    policy: DecisionPolicy
    merged: list[str]

    def verification(self, embedded: Embedded | None = None) -> Verification:
        return Verification(pair_scores_for(embedded or self.embedded), self.names)

    def scores(self, probe_rows: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray:
        """(probes, gallery) float32 cosine of the rows' templates."""
        t = self.embedded.templates
        return t[probe_rows] @ t[gallery_rows].T


def load_lfw(report: Report, folder: Path, quick: bool) -> Lfw:
    """lfw-dev through the served pipeline, label noise merged, against the shipped model."""
    model = load_score_model(default_pack().model_id)
    pipeline = Pipeline(threads=1)
    # the shipped thresholds describe the templates of one pipeline setting; measured on
    # another they prove nothing (the service would refuse to start with them)
    report.check("lfw_pipeline_settings_match_the_score_model",
                 pipeline.settings_hash() == model.settings_hash,
                 f"pipeline {pipeline.settings_hash()}, score model {model.settings_hash}: "
                 "re-run matcher calibrate if they differ")
    embedded, merged = merge_label_noise(embedded_lfw(folder, pipeline, quick), model)
    names, person = np.unique(embedded.identities, return_inverse=True)
    replicates = 100 if quick else 200
    report.param(lfw={
        "folder": str(folder), "photos": int(len(embedded.files)),
        "identities": int(len(names)),
        "subset": "600 people drawn with seed 0, at most 10 photos each" if quick else "all",
        "photos_per_person_cap": "10 (first in label order) for every statistic",
        "bootstrap": f"{replicates} resamples of identities (seed 0); intervals are 95 %",
        "label_noise_merged": merged,
        "score_model": f"{model.model_id} settings {model.settings_hash}",
    })
    return Lfw(folder, quick, embedded, names, person.astype(np.int64),
               identity_weights(len(names), replicates), model, DecisionPolicy(), merged)
