"""Open-set 1:N on lfw-dev: who is enrolled, who probes, and FNIR / FPIR under the
service's decision rule (threshold + margin), with the identity bootstrap of _lfw.

The protocol (issue 10, item 5): people with two or more usable photos are split in two
halves by a seeded permutation. One half is enrolled with its first photo and probes with
its other photos (mated probes); the other half is never enrolled and probes with all its
photos (non-mated probes). People with a single photo are enrolled as distractors: they
make the gallery larger and are nobody's mate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from matcher.calibrate.pairs import capped_rows

from ._lfw import SEED

if TYPE_CHECKING:
    from ._lfw import Lfw


@dataclass
class Protocol:
    """Row indices into the embedded set, and the identity index of each."""

    gallery: np.ndarray         # (g,) rows enrolled, one per person
    gallery_person: np.ndarray  # (g,)
    mated: np.ndarray           # (p,) probe rows whose person is enrolled
    mated_person: np.ndarray
    nonmated: np.ndarray        # (q,) probe rows of people never enrolled
    nonmated_person: np.ndarray
    enrolled_multi: np.ndarray  # (e,) identities enrolled that have more photos
    distractors: np.ndarray     # (d,) identities with one photo (enrolled, never probe)
    unknown: np.ndarray         # (u,) identities never enrolled


def rank_within_person(person: np.ndarray) -> np.ndarray:
    """0 for each person's first row (in row order), 1 for the second, ..."""
    order = np.argsort(person, kind="stable")
    sorted_p = person[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(sorted_p)]))
    rank = np.empty(len(person), dtype=np.int64)
    rank[order] = np.arange(len(person)) - first
    return rank


def split(rows: np.ndarray, person: np.ndarray, seed: int = SEED) -> Protocol:
    """The protocol over ``rows`` (row order decides each person's first photo)."""
    who = person[rows]
    counts = np.bincount(who, minlength=person.max() + 1)
    multi = np.flatnonzero(counts >= 2)
    multi = np.random.default_rng(seed).permutation(multi)
    enrolled, unknown = np.sort(multi[: len(multi) // 2]), np.sort(multi[len(multi) // 2:])
    singles = np.flatnonzero(counts == 1)
    rank = rank_within_person(who)
    is_enrolled = np.isin(who, enrolled)
    is_single = np.isin(who, singles)
    gallery = rows[(rank == 0) & (is_enrolled | is_single)]
    mated = rows[(rank > 0) & is_enrolled]
    nonmated = rows[np.isin(who, unknown)]
    return Protocol(gallery, person[gallery], mated, person[mated], nonmated,
                    person[nonmated], enrolled, singles, unknown)


# -- search results -------------------------------------------------------------------

@dataclass
class Ranked:
    """Top-2 of each probe over the gallery's people (one score per person)."""

    top1: np.ndarray      # (n,) best score
    top1_person: np.ndarray
    top2: np.ndarray      # (n,) best score of another person (-inf with one person)
    probe_person: np.ndarray
    mated: np.ndarray     # (n,) bool: the probe's person is in the gallery


def person_scores(scores: np.ndarray, column_person: np.ndarray, fuse: str = "max"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probes, people) scores fused over each person's templates, and the people.

    scores (n, g); several columns of one person (multi-photo enrolment) become one, by
    the max or the mean of their scores."""
    order = np.argsort(column_person, kind="stable")
    people, starts = np.unique(column_person[order], return_index=True)
    s = scores[:, order]
    if fuse == "max":
        return np.maximum.reduceat(s, starts, axis=1), people
    if fuse == "mean":
        sizes = np.diff(np.r_[starts, s.shape[1]])
        return np.add.reduceat(s, starts, axis=1) / sizes, people
    raise ValueError(f"fuse must be 'max' or 'mean', got: {fuse!r}")


def rank(scores: np.ndarray, people: np.ndarray, probe_person: np.ndarray) -> Ranked:
    """Top-1 and top-2 of person-level ``scores`` (n, people)."""
    n, g = scores.shape
    if g == 1:
        return Ranked(scores[:, 0], np.repeat(people, n), np.full(n, -np.inf),
                      probe_person, probe_person == people[0])
    top = np.argpartition(-scores, 1, axis=1)[:, :2]
    pair = np.take_along_axis(scores, top, 1)
    first = np.argmax(pair, axis=1)
    top1 = pair[np.arange(n), first]
    top2 = pair[np.arange(n), 1 - first]
    return Ranked(top1, people[top[np.arange(n), first]], top2, probe_person,
                  np.isin(probe_person, people))


def matches(r: Ranked, threshold: float, margin: float) -> np.ndarray:
    """matcher.gallery.decision.decide_identification for every probe: MATCH or not (bool)."""
    return (r.top1 >= threshold) & (r.top1 - r.top2 >= margin)


def rates(r: Ranked, threshold: float, margin: float, W: np.ndarray,
          refused: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FNIR, FPIR), each (R,) under identity weights W.

    A mated probe is a hit when it MATCHes its own person; a non-mated probe is a false
    positive when it MATCHes anybody. ``refused`` probes (quality gate) are never a MATCH.
    """
    match = matches(r, threshold, margin)
    if refused is not None:
        match &= ~refused
    hit = match & (r.top1_person == r.probe_person)
    w = W[:, r.probe_person]
    fnir = (w * (r.mated & ~hit)).sum(1) / (w * r.mated).sum(1)
    fpir = (w * (~r.mated & match)).sum(1) / (w * ~r.mated).sum(1)
    return fnir, fpir


def fnir_at_fpir(r: Ranked, fpirs: tuple[float, ...], W: np.ndarray) -> np.ndarray:
    """(R, k) FNIR at thresholds set on the data so FPIR <= each target (no margin), as in
    NIST FRVT's identification DET."""
    non = ~r.mated
    order = np.argsort(-r.top1[non], kind="stable")
    desc = r.top1[non][order]
    w_non = W[:, r.probe_person[non]][:, order]
    cum = np.cumsum(w_non, 1) / w_non.sum(1, keepdims=True)
    mated = r.mated
    correct = (r.top1_person == r.probe_person)[mated]
    w_m = W[:, r.probe_person[mated]]
    out = np.empty((len(W), len(fpirs)))
    for k, f in enumerate(fpirs):
        allowed = (cum <= f).sum(1)                     # non-mated probes allowed to pass
        threshold = np.where(allowed < len(desc), desc[np.minimum(allowed, len(desc) - 1)]
                             + 1e-7, -np.inf)
        hit = correct[None, :] & (r.top1[mated][None, :] >= threshold[:, None])
        out[:, k] = 1.0 - (w_m * hit).sum(1) / w_m.sum(1)
    return out


def fnir_fpir_curve(r: Ranked, points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(FPIR, FNIR) as the threshold sweeps the non-mated top-1 scores (point estimate)."""
    fpirs = np.geomspace(1.0 / max(1, (~r.mated).sum()), 1.0, points)
    fnir = fnir_at_fpir(r, tuple(fpirs), np.ones((1, int(r.probe_person.max()) + 1)))[0]
    return fpirs, fnir



# -- variants of item 4 -----------------------------------------------------------------

def frame_groups(rows: np.ndarray, person: np.ndarray, frames: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(groups (k, frames) of rows, their person): consecutive photos of one person taken
    ``frames`` at a time, standing in for the frames a lane streams of one traveller."""
    who = person[rows]
    order = np.argsort(who, kind="stable")
    rows, who = rows[order], who[order]
    r = rank_within_person(who)
    sizes = np.bincount(who, minlength=person.max() + 1)[who]
    full = r < (sizes // frames) * frames          # drop an incomplete last group
    rows, who = rows[full], who[full]
    return rows.reshape(-1, frames), who[::frames]


def fuse_frames(scores: np.ndarray, frames: int, how: str) -> np.ndarray:
    """(k * frames, g) scores of grouped probe rows -> (k, g), by max or mean."""
    s = scores.reshape(-1, frames, scores.shape[1])
    if how == "max":
        return s.max(axis=1)
    if how == "mean":
        return s.mean(axis=1)
    raise ValueError(f"how must be 'max' or 'mean', got: {how!r}")


def cohort_znorm(scores: np.ndarray, gallery: np.ndarray, cohort: np.ndarray) -> np.ndarray:
    """Z-normalise each gallery column by its own impostor scores against a cohort.

    scores (n, g) probe x gallery; gallery (g, 512) and cohort (c, 512) templates of
    different people than each other and than the probes. A template that scores high
    against everyone (a "lamb" that many strangers resemble) is pulled down.
    """
    c = cohort @ gallery.T                          # (c, g) impostor scores per column
    mu, sd = c.mean(axis=0), c.std(axis=0, ddof=1)
    return (scores - mu) / sd


@dataclass
class OpenSet:
    """The main protocol's probes x gallery, person-level (one column per person)."""

    proto: Protocol
    scores: np.ndarray       # (probes, people) float32; probes = mated then non-mated
    people: np.ndarray       # (people,) identity of each column
    ranked: Ranked
    fnir_at: np.ndarray | None = None       # (R, len(FPIRS)), FPIRS of _accuracy_lfw
    curve: tuple | None = None              # (FPIR, FNIR) for the plot
    growth: list[dict] = field(default_factory=list)
    modelled: list[dict] = field(default_factory=list)


def open_set_of(lfw: Lfw) -> OpenSet:
    """The main protocol on ``lfw``'s usable rows (at most 10 a person), ranked."""
    rows = capped_rows(lfw.embedded.identities, lfw.embedded.usable())
    proto = split(rows, lfw.person)
    probes = np.concatenate([proto.mated, proto.nonmated])
    scores, people = person_scores(lfw.scores(probes, proto.gallery), proto.gallery_person)
    return OpenSet(proto, scores, people, rank(scores, people, lfw.person[probes]))
