"""Scores -> decisions: operating points per model, thresholds, the margin rule, MATCH / NO_MATCH.

Operating points
----------------
A threshold is chosen from a target error rate, never typed in:

* 1:1 (verify against the claimed traveller): the false-match rate FMR of one comparison.
  threshold = the point where the model's impostor score distribution has FMR mass above it.
* 1:N (identify among N travellers): the false-positive identification rate FPIR, the chance
  that a probe of someone *not* in the gallery matches anyone. With independent impostor
  comparisons FPIR = 1 - (1 - FMR)^N, so each comparison must meet
  FMR = 1 - (1 - FPIR)^(1/N) (about FPIR / N): the threshold rises with gallery size.

The impostor distribution is modelled per embedder as a Gaussian on cosine similarity
(``ScoreModel``); how each model's figures were derived is written next to them below and in
docs/operating-points.md. A floor (``DecisionPolicy.min_threshold``) stops a loose target
from pushing the threshold into the observed impostor range.

Margin rule: a 1:N MATCH also needs top-1 minus top-2 (best score of the next traveller) to
be at least ``margin``; two travellers scoring alike is NO_MATCH (ambiguous), never a guess.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Protocol

import numpy as np

from .errors import GalleryError, InvalidInput, UnknownTraveller
from .index import Candidate


class Outcome(str, enum.Enum):
    MATCH = "MATCH"
    NO_MATCH = "NO_MATCH"


class Reason(str, enum.Enum):
    ABOVE_THRESHOLD = "above_threshold"
    BELOW_THRESHOLD = "below_threshold"
    AMBIGUOUS = "ambiguous"                  # top-1 and top-2 closer than the margin
    UNKNOWN_TRAVELLER = "unknown_traveller"  # claimed id is not in the gallery
    OUTSIDE_WINDOW = "outside_window"        # claimed booking not valid now
    EMPTY_GALLERY = "empty_gallery"          # nobody valid now to compare with


@dataclass(frozen=True)
class ScoreModel:
    """How one embedder's cosine scores are distributed, and where the figures come from."""

    model_id: str
    impostor_mean: float
    impostor_std: float
    impostor_max: float     # highest impostor score observed in the calibration set
    genuine_min: float      # lowest genuine score observed in the calibration set
    derivation: str

    def fmr_at(self, threshold: float) -> float:
        """Modelled false-match rate of one comparison at ``threshold``."""
        z = (threshold - self.impostor_mean) / self.impostor_std
        return 0.5 * math.erfc(z / math.sqrt(2.0))

    def threshold_at_fmr(self, fmr: float) -> float:
        if not 0.0 < fmr < 1.0:
            raise InvalidInput(f"a false-match rate must be in (0, 1), got {fmr}")
        # -inv_cdf(fmr) rather than inv_cdf(1 - fmr): 1 - 1e-12 loses most of its digits.
        return self.impostor_mean - NormalDist().inv_cdf(fmr) * self.impostor_std


# SCRFD-500M + MobileFaceNet w600k (the default pack, see models.py).
# Derived from the 22 single-face photos in shared/data/faces (6 people) run through
# matcher.pipeline: 168 different-person pairs have cosine mean -0.006, sample std 0.077,
# max 0.143; 63 same-person pairs have min 0.518 (mean 0.76). A Gaussian fitted to the
# impostor pairs gives the tail used below. 168 pairs from 6 people cannot show the tail at
# 1e-6 directly: the fit is the assumption, and it must be re-derived on a large impostor
# set (thousands of identities) before the gate goes live. See docs/operating-points.md.
W600K_MBF = ScoreModel(
    model_id="scrfd500m-mbf-w600k@9cc6e4a75f0e",
    impostor_mean=-0.006, impostor_std=0.077, impostor_max=0.143, genuine_min=0.518,
    derivation="Gaussian fit to 168 impostor pairs of shared/data/faces via matcher.pipeline",
)

SCORE_MODELS: dict[str, ScoreModel] = {W600K_MBF.model_id: W600K_MBF}


def score_model_for(model_id: str) -> ScoreModel:
    try:
        return SCORE_MODELS[model_id]
    except KeyError:
        raise GalleryError(f"no operating points are derived for model {model_id}; derive "
                           f"them (docs/operating-points.md) before matching with it") from None


@dataclass(frozen=True)
class OperatingPoint:
    mode: str                  # "1:1" or "1:N"
    target: float              # FMR (1:1) or FPIR (1:N)
    gallery_size: int | None   # N for 1:N
    comparison_fmr: float      # FMR each single comparison must meet
    threshold: float


def per_comparison_fmr(fpir: float, gallery_size: int) -> float:
    """FMR per comparison so that N independent comparisons give ``fpir``."""
    if not 0.0 < fpir < 1.0:
        raise InvalidInput(f"a false-positive identification rate must be in (0, 1), got {fpir}")
    n = max(1, gallery_size)
    return -math.expm1(math.log1p(-fpir) / n)


def operating_point_1to1(model: ScoreModel, fmr: float, floor: float) -> OperatingPoint:
    return OperatingPoint("1:1", fmr, None, fmr, max(floor, model.threshold_at_fmr(fmr)))


def operating_point_1toN(model: ScoreModel, fpir: float, gallery_size: int, floor: float
                         ) -> OperatingPoint:
    fmr = per_comparison_fmr(fpir, gallery_size)
    return OperatingPoint("1:N", fpir, gallery_size, fmr,
                          max(floor, model.threshold_at_fmr(fmr)))


@dataclass(frozen=True)
class DecisionPolicy:
    """Targets, not thresholds: thresholds follow from them, the model and gallery size."""

    fmr_1to1: float = 1e-5
    fpir_1toN: float = 1e-3
    margin: float = 0.10
    min_threshold: float = 0.20
    fallback_to_search: bool = True  # claim-then-search: try 1:N when the claim fails

    def __post_init__(self) -> None:
        for name in ("fmr_1to1", "fpir_1toN"):
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


class SearchableGallery(Protocol):
    model_id: str

    @property
    def size(self) -> int: ...

    def search(self, probes: np.ndarray, k: int = 5, now: datetime | float | None = None
               ) -> list[list[Candidate]]: ...

    def score_traveller(self, traveller_id: str, probe: np.ndarray,
                        now: datetime | float | None = None): ...


class Decider:
    """Turns gallery scores into decisions under one policy, for one model."""

    def __init__(self, gallery: SearchableGallery, policy: DecisionPolicy | None = None,
                 score_model: ScoreModel | None = None) -> None:
        self.gallery = gallery
        self.policy = policy or DecisionPolicy()
        self.score_model = score_model or score_model_for(gallery.model_id)
        self.point_1to1 = operating_point_1to1(self.score_model, self.policy.fmr_1to1,
                                               self.policy.min_threshold)

    def point_1toN(self, gallery_size: int | None = None) -> OperatingPoint:
        n = self.gallery.size if gallery_size is None else gallery_size
        return operating_point_1toN(self.score_model, self.policy.fpir_1toN, n,
                                    self.policy.min_threshold)

    def verify(self, probe: np.ndarray, traveller_id: str,
               now: datetime | float | None = None) -> Decision:
        """1:1 against the claimed traveller. probe (512,) float32 L2-normalised."""
        t = self.point_1to1.threshold
        try:
            claim = self.gallery.score_traveller(traveller_id, probe, now)
        except UnknownTraveller:
            return Decision(Outcome.NO_MATCH, Reason.UNKNOWN_TRAVELLER, "verify", None, None, t,
                            traveller_id)
        if not claim.within_window:
            return Decision(Outcome.NO_MATCH, Reason.OUTSIDE_WINDOW, "verify", None,
                            claim.score, t, traveller_id)
        if claim.score >= t:
            return Decision(Outcome.MATCH, Reason.ABOVE_THRESHOLD, "verify", traveller_id,
                            claim.score, t, traveller_id)
        return Decision(Outcome.NO_MATCH, Reason.BELOW_THRESHOLD, "verify", None, claim.score,
                        t, traveller_id)

    def identify_many(self, probes: np.ndarray, k: int = 5,
                      now: datetime | float | None = None) -> list[Decision]:
        """1:N for each probe (n, 512); one batched gallery search."""
        k = max(k, 2)  # the margin rule needs the runner-up
        t = self.point_1toN().threshold
        decisions = []
        for cands in self.gallery.search(probes, k, now):
            outcome, reason = decide_identification(cands, t, self.policy.margin)
            decisions.append(Decision(
                outcome, reason, "identify",
                cands[0].traveller_id if outcome is Outcome.MATCH else None,
                cands[0].score if cands else None, t, None, tuple(cands)))
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
        the caller decides what a different identity means at the gate).
        """
        first = self.verify(probe, traveller_id, now)
        use_fallback = self.policy.fallback_to_search if fallback is None else fallback
        if first.is_match or not use_fallback:
            return first
        second = self.identify(probe, k, now)
        if not second.is_match:
            return Decision(first.outcome, first.reason, first.mode, None, first.score,
                            first.threshold, traveller_id, second.candidates, True)
        return Decision(second.outcome, second.reason, "identify", second.traveller_id,
                        second.score, second.threshold, traveller_id, second.candidates, True)
