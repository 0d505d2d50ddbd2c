"""Scores -> decisions: operating points, thresholds, the margin rule, MATCH / NO_MATCH.

A threshold is chosen from a target error rate and the pipeline's score model
(matcher/gallery/scoremodel.py, made by ``matcher calibrate``), never typed in:

* 1:1 (verify against the claimed traveller): the false-match rate FMR of one comparison;
  the threshold is the score model's upper confidence bound for that FMR.
* 1:N (identify among N travellers): the false-positive identification rate FPIR, the chance
  that someone *not* in the gallery matches anyone. Each comparison must then meet
  FMR = FPIR / N (the union bound: it holds however the N comparisons depend on each
  other), so the threshold rises with gallery size. Where FPIR / N lies below what the
  calibration data supports, the operating point says so (``supported`` False) and every
  answer made with it carries that fact: the claim-then-search flow (``Clear``), which
  needs 1:1 only when the claim holds, is the one that stays safe at any N.

Margin rule: a 1:N MATCH also needs top-1 minus top-2 (best score of the next traveller) to
be at least ``margin``; two travellers scoring alike is NO_MATCH (ambiguous), never a guess.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from ..errors import InvalidInput, UnknownTraveller
from ..templates import Candidate
from .scoremodel import FUSED, SINGLE, ScoreModel, load_score_model
from .served import ServedGallery


class Outcome(enum.StrEnum):
    MATCH = "MATCH"
    NO_MATCH = "NO_MATCH"


class Reason(enum.StrEnum):
    ABOVE_THRESHOLD = "above_threshold"
    BELOW_THRESHOLD = "below_threshold"
    AMBIGUOUS = "ambiguous"                  # top-1 and top-2 closer than the margin
    UNKNOWN_TRAVELLER = "unknown_traveller"  # claimed id is not in the gallery
    OUTSIDE_WINDOW = "outside_window"        # claimed booking not valid now
    EMPTY_GALLERY = "empty_gallery"          # nobody valid now to compare with


@dataclass(frozen=True)
class OperatingPoint:
    mode: str                  # "1:1" or "1:N"
    target: float              # FMR (1:1) or FPIR (1:N)
    gallery_size: int | None   # N for 1:N
    comparison_fmr: float      # FMR each single comparison must meet
    threshold: float
    supported: bool = True     # False: comparison_fmr lies beyond the calibration data
    max_gallery_size: int | None = None  # 1:N: the largest N the data supports


def per_comparison_fmr(fpir: float, gallery_size: int) -> float:
    """FMR per comparison so that N comparisons give at most ``fpir`` (union bound)."""
    if not 0.0 < fpir < 1.0:
        raise InvalidInput(f"a false-positive identification rate must be in (0, 1), got {fpir}")
    return fpir / max(1, gallery_size)


def operating_point_1to1(model: ScoreModel, fmr: float, floor: float,
                         confidence: float | None = None, kind: str | None = None
                         ) -> OperatingPoint:
    """``kind``: the booking the claim is checked against (scoremodel.SINGLE or FUSED);
    None holds for either."""
    return OperatingPoint("1:1", fmr, None, fmr,
                          max(floor, model.threshold_at_fmr(fmr, confidence, kind)),
                          model.supports_fmr(fmr))


def operating_point_1toN(model: ScoreModel, fpir: float, gallery_size: int, floor: float,
                         confidence: float | None = None) -> OperatingPoint:
    """Thresholds from the model's search variant (look-alike pairs stated apart)."""
    model = model.for_search
    fmr = per_comparison_fmr(fpir, gallery_size)
    return OperatingPoint("1:N", fpir, gallery_size, fmr,
                          max(floor, model.threshold_at_fmr(fmr, confidence)),
                          model.supports_fmr(fmr), model.max_gallery_size(fpir))


def consistency_threshold(model: ScoreModel, policy: DecisionPolicy) -> float:
    """The cosine at which two booking photos' faces are one traveller's (the enrolment
    rule's, matcher.face.enrolment): one photo against one photo at ``fmr_consistency``."""
    return operating_point_1to1(model, policy.fmr_consistency, policy.min_threshold,
                                policy.confidence_1to1, SINGLE).threshold


# Chosen by identity-disjoint cross-validation on lfw-dev (benchmarks/_threshold_cv.py).
CONFIDENCE_1TON = 0.5


@dataclass(frozen=True)
class DecisionPolicy:
    """Targets, not thresholds: thresholds follow from them, the model and gallery size.

    ``confidence_*``: the confidence of the score model's upper bound a threshold is taken
    at (over identity resamples). The 1:N default is the level the identity-disjoint
    cross-validation of ``matcher bench --only accuracy`` chose: the one whose FPIR held on
    unseen people at every gallery size with the fewest misses (docs/operating-points.md).
    """

    fmr_1to1: float = 1e-5
    fpir_1toN: float = 1e-3
    # Two booking photos' faces are taken for one traveller at the 1:1 threshold of this
    # FMR: a booking of two people's photos passes no more often than a never-booked
    # stranger is matched at the gate (fpir_1toN); docs/operating-points.md#enrolment.
    fmr_consistency: float = 1e-3
    margin: float = 0.10
    min_threshold: float = 0.20
    fallback_to_search: bool = True  # claim-then-search: try 1:N when the claim fails
    confidence_1to1: float = 0.95
    confidence_1toN: float = CONFIDENCE_1TON

    def __post_init__(self) -> None:
        for name in ("fmr_1to1", "fpir_1toN", "fmr_consistency", "confidence_1to1",
                     "confidence_1toN"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidInput(f"{name} must be in (0, 1)")
        if not 0.0 <= self.margin < 1.0:
            raise InvalidInput("margin must be in [0, 1)")


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: Reason
    mode: str                       # "verify" or "identify": how this answer was reached
    traveller_id: str | None        # the matched traveller (None for NO_MATCH)
    score: float | None             # the deciding score (top-1 for identify)
    threshold: float
    claimed_traveller_id: str | None = None
    candidates: tuple[Candidate, ...] = field(default=())
    fallback_used: bool = False
    # False when the threshold rests on an FMR beyond the calibration data (see module doc)
    supported: bool = True
    # The gallery_version the deciding search or booking read saw (None: no gallery read)
    gallery_version: int | None = None

    @property
    def is_match(self) -> bool:
        return self.outcome is Outcome.MATCH


def decide_identification(candidates: list[Candidate], threshold: float, margin: float
                          ) -> tuple[Outcome, Reason]:
    """Top-1 must clear the threshold and lead top-2 by ``margin``."""
    if not candidates:
        return Outcome.NO_MATCH, Reason.EMPTY_GALLERY
    top1 = candidates[0].score
    if top1 < threshold:
        return Outcome.NO_MATCH, Reason.BELOW_THRESHOLD
    if len(candidates) > 1 and top1 - candidates[1].score < margin:
        return Outcome.NO_MATCH, Reason.AMBIGUOUS
    return Outcome.MATCH, Reason.ABOVE_THRESHOLD


class Decider:
    """Turns gallery scores into decisions under one policy, for one model.

    ``score_model``: by default the one shipped for the gallery's model; one given is the
    caller's to check (scoremodel.check_settings, as MatchEngine does).
    """

    def __init__(self, gallery: ServedGallery, policy: DecisionPolicy | None = None,
                 score_model: ScoreModel | None = None) -> None:
        self.gallery = gallery
        self.policy = policy or DecisionPolicy()
        self.score_model = score_model or load_score_model(gallery.model_id)
        self._points_1toN: dict[int, OperatingPoint] = {}  # by N; model and policy fixed
        # A claim is one comparison with the traveller's booking: one photo, or several
        # fused, each kind at its own threshold (the fused tail is the heavier one).
        self.points_1to1 = {kind: operating_point_1to1(
            self.score_model, self.policy.fmr_1to1, self.policy.min_threshold,
            self.policy.confidence_1to1, kind) for kind in (SINGLE, FUSED)}

    @property
    def point_1to1(self) -> OperatingPoint:
        """The 1:1 point that holds whatever the booking (what GetGalleryInfo reports)."""
        return max(self.points_1to1.values(), key=lambda p: p.threshold)

    def point_1to1_for(self, photos: int) -> OperatingPoint:
        """The 1:1 point for a traveller booked with ``photos`` photos."""
        return self.points_1to1[FUSED if photos > 1 else SINGLE]

    @property
    def same_person(self) -> float:
        """The score at which two captures of one photo each are one person: the
        single-photo 1:1 threshold. What frames of one probe must reach between them
        (matcher.face.frames) and a capture against a document's portrait."""
        return self.point_1to1_for(1).threshold

    def point_1toN(self, gallery_size: int | None = None,
                   now: datetime | float | None = None) -> OperatingPoint:
        """1:N over ``gallery_size`` comparisons; by default the travellers whose booking
        window is open at ``now``: the set a search looks at, one fused template each."""
        n = self.gallery.searchable(now) if gallery_size is None else gallery_size
        point = self._points_1toN.get(n)
        if point is None:
            # ~1 ms of quantiles over every resample and kind: once per N, not per search
            if len(self._points_1toN) >= 4096:
                self._points_1toN.clear()
            point = self._points_1toN[n] = operating_point_1toN(
                self.score_model, self.policy.fpir_1toN, n, self.policy.min_threshold,
                self.policy.confidence_1toN)
        return point

    def verify(self, probe: np.ndarray, traveller_id: str,
               now: datetime | float | None = None) -> Decision:
        """1:1 against the claimed traveller. probe (512,) float32 L2-normalised; raises
        UnknownTraveller for a traveller the gallery does not hold."""
        claim = self.gallery.score_traveller(traveller_id, probe, now)
        t = self.point_1to1_for(claim.photos).threshold
        if not claim.within_window:
            outcome, reason, matched = Outcome.NO_MATCH, Reason.OUTSIDE_WINDOW, None
        elif claim.score >= t:
            outcome, reason, matched = Outcome.MATCH, Reason.ABOVE_THRESHOLD, traveller_id
        else:
            outcome, reason, matched = Outcome.NO_MATCH, Reason.BELOW_THRESHOLD, None
        return Decision(outcome, reason, "verify", matched, claim.score, t, traveller_id,
                        gallery_version=claim.gallery_version)

    def identify_many(self, probes: np.ndarray, k: int = 5,
                      now: datetime | float | None = None) -> list[Decision]:
        """1:N for each probe (n, 512); one batched gallery search.

        The threshold is the one for the N the search itself looked at, and each decision
        names the gallery_version searched: an enrolment or a hot swap meanwhile changes
        neither apart from the search.
        """
        k = max(k, 2)  # the margin rule needs the runner-up
        found = self.gallery.search(probes, k, now)
        point = self.point_1toN(gallery_size=found.searchable)
        t = point.threshold
        decisions = []
        for cands in found:
            outcome, reason = decide_identification(cands, t, self.policy.margin)
            decisions.append(Decision(
                outcome, reason, "identify",
                cands[0].traveller_id if outcome is Outcome.MATCH else None,
                cands[0].score if cands else None, t, None, tuple(cands),
                supported=point.supported, gallery_version=found.gallery_version))
        return decisions

    def identify(self, probe: np.ndarray, k: int = 5,
                 now: datetime | float | None = None) -> Decision:
        return self.identify_many(np.asarray(probe)[None, :] if np.ndim(probe) == 1 else probe,
                                  k, now)[0]

    def claim_then_search(self, probe: np.ndarray, traveller_id: str,
                          now: datetime | float | None = None, k: int = 5,
                          fallback: bool | None = None) -> Decision:
        """Verify the claim; if it fails and fallback is on, identify 1:N instead.

        A fallback MATCH names whoever the probe matched (maybe not the claimed traveller:
        the caller decides what a different identity means at the gate). An unknown claim
        is a failed claim here (UNKNOWN_TRAVELLER), not an error: the search may still
        clear the traveller.
        """
        try:
            first = self.verify(probe, traveller_id, now)
        except UnknownTraveller:
            first = Decision(Outcome.NO_MATCH, Reason.UNKNOWN_TRAVELLER, "verify", None, None,
                             self.point_1to1.threshold, traveller_id)
        use_fallback = self.policy.fallback_to_search if fallback is None else fallback
        if first.is_match or not use_fallback:
            return first
        second = self.identify(probe, k, now)
        if not second.is_match:
            return Decision(first.outcome, first.reason, first.mode, None, first.score,
                            first.threshold, traveller_id, second.candidates, True,
                            gallery_version=second.gallery_version)
        return Decision(second.outcome, second.reason, "identify", second.traveller_id,
                        second.score, second.threshold, traveller_id, second.candidates, True,
                        second.supported, second.gallery_version)
