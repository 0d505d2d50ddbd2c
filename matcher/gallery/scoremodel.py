"""How one pipeline's scores are distributed: the file decision.py derives thresholds from.

A score model is made by ``matcher calibrate`` from labelled photos and shipped as JSON
(matcher/score_models/). It holds:

* the impostor tail: the empirical exceedance curve down to the data's resolution and,
  beyond it, a generalised Pareto distribution (GPD) fitted to the top impostor scores
  (peaks over threshold). The bulk of the distribution never sets a threshold.
* bootstrap replicates of that fit, drawn by resampling *identities*, so a threshold can
  be taken at the upper confidence bound: a promised FMR holds with ``confidence``.
* the genuine distribution (FNMR by threshold, with its confidence band).
* ``fmr_floor``: the lowest per-comparison FMR the data supports. Below it any threshold
  is an extrapolation, and decision.py says so instead of guessing silently.
* the pipeline settings hash it was made with: a server whose pipeline hashes otherwise
  refuses to start, because these scores no longer describe its templates.
* optionally, ``groups``: the same model fitted to the pairs within each demographic group
  of the labels (nationality, say; docs/demographics.md). With ``worst_group`` on, every
  threshold is also the worst over the groups, so one threshold keeps the promise in each
  group and the service never needs to know a traveller's group.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..durable import atomic_write_text
from ..errors import GalleryError, InvalidInput

SINGLE, FUSED = "single", "fused"  # comparison kinds: one booking photo, or several fused
FORMAT = 2  # 2: resolved-tail resamples kept whole; comparison kinds
# The resolved tail's resampled thresholds in whole units of 1e-5 (older files of this
# format hold them as decimals under "thresholds"; both are read).
THRESHOLDS_E5 = "thresholds_e5"
SHIPPED_PACKAGE = "matcher.score_models"


# -- the generalised Pareto tail ------------------------------------------------------

def gpd_fit(excess: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(xi, sigma) of a GPD fitted to ``excess`` > 0 (scores minus the tail threshold).

    Zhang & Stephens (2009), "A new and efficient estimation method for the generalized
    Pareto distribution" (Technometrics 51:316): an empirical-Bayes average over a grid of
    the profile likelihood. No optimiser, no starting point, defined for any shape sign
    (cosine scores are bounded, so the true tail may well be short, xi < 0). Integer
    ``weights`` count how often each excess occurs (a bootstrap resample).
    """
    x = np.asarray(excess, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = (x > 0) & (w > 0)
    x, w = x[keep], w[keep]
    if w.sum() < 10:
        raise InvalidInput(f"a tail fit needs at least 10 exceedances, got {w.sum():.0f}")
    order = np.argsort(x)
    x, w = x[order], w[order]
    n = w.sum()
    cum = np.cumsum(w)
    x_quartile = x[np.searchsorted(cum, 0.25 * n)]
    m = 30 + int(math.sqrt(n))
    j = np.arange(1, m + 1)
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * x_quartile)
    k = (np.log1p(-theta[:, None] * x[None, :]) * w).sum(axis=1) / n
    profile = n * (np.log(-theta / k) - k - 1.0)
    weights_theta = np.exp(profile - profile.max())  # the posterior weights, a softmax
    weights_theta /= weights_theta.sum()
    theta_hat = float((theta * weights_theta).sum())
    k_hat = float((np.log1p(-theta_hat * x) * w).sum() / n)
    return k_hat, -k_hat / theta_hat  # k_hat is the usual shape xi; sigma = -xi / theta


def gpd_isf(q: np.ndarray | float, xi: np.ndarray | float, sigma: np.ndarray | float
            ) -> np.ndarray:
    """Excess above the tail threshold exceeded with conditional probability ``q``."""
    q, xi, sigma = np.asarray(q, float), np.asarray(xi, float), np.asarray(sigma, float)
    small = np.abs(xi) < 1e-9
    safe = np.where(small, 1.0, xi)
    return np.where(small, -sigma * np.log(q), sigma / safe * (q ** -safe - 1.0))


def gpd_sf(y: np.ndarray | float, xi: float, sigma: float) -> np.ndarray:
    """P(excess > y) for y >= 0 (0 beyond the endpoint of a short tail)."""
    y = np.maximum(np.asarray(y, float), 0.0)
    if abs(xi) < 1e-9:
        return np.exp(-y / sigma)
    base = 1.0 + xi * y / sigma
    return np.where(base > 0, np.maximum(base, 1e-300) ** (-1.0 / xi), 0.0)


# -- the model ------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreModel:
    """One pipeline's score distributions; see the module docstring.

    ``kinds`` holds the models of the other comparisons the service makes (``fused``: a
    traveller's fused booking template against one capture); every threshold and rate is
    the worst over this model and its kinds, so a promise holds for each of them.
    """

    model_id: str
    settings_hash: str
    confidence: float               # the default confidence of a threshold's upper bound
    tail_fmr: float                 # p_u: fraction of impostor pairs above the tail threshold
    tail: tuple[float, float, float]  # (u, xi, sigma) fitted to all the data
    replicates: np.ndarray          # (B, 3) (u, xi, sigma), identities resampled
    fmr_floor: float                # lowest per-comparison FMR the data supports
    empirical: np.ndarray           # (k, 2) (score, FMR): exceedance curve, ascending score
    genuine: np.ndarray             # (g, 4) (score, FNMR, FNMR lo, FNMR hi)
    document: dict = field(repr=False, compare=False, default_factory=dict)
    # The empirical tail where the data resolves the rate: (r,) FMRs, descending, and the
    # (B, r) threshold of each identity resample at each of them.
    resolved_fmr: np.ndarray = field(repr=False, compare=False,
                                     default_factory=lambda: np.empty(0))
    resolved_thresholds: np.ndarray = field(repr=False, compare=False,
                                            default_factory=lambda: np.empty((0, 0)))
    kinds: dict = field(repr=False, compare=False, default_factory=dict)
    # The model 1:N thresholds come from: the same data with the look-alike pairs stated
    # apart (relatives no threshold separates); None: this one.
    search: ScoreModel | None = field(repr=False, compare=False, default=None)
    # Within-group models (group name -> model of the pairs inside that group, with its own
    # kinds) and whether thresholds hold in the worst of them as well as overall.
    groups: dict = field(repr=False, compare=False, default_factory=dict)
    worst_group: bool = field(compare=False, default=False)
    # The confidence a group's bound is taken at, at most the threshold's own (None: the
    # same). A group holds a fraction of the people, so its upper bound is set by resampling
    # one or two look-alike people; calibrate's default takes each group's median and states
    # the bound (docs/demographics.md).
    group_confidence: float | None = field(compare=False, default=None)

    @property
    def for_search(self) -> ScoreModel:
        """The model a 1:N threshold is derived from (see ``search``)."""
        return self.search if self.search is not None else self

    def with_worst_group(self, on: bool) -> ScoreModel:
        """This model (and its search variant) with the worst-group rule on or off: off
        gives the population thresholds a group table compares against."""
        search = self.search.with_worst_group(on) if self.search is not None else None
        return replace(self, worst_group=on and bool(self.groups), search=search)

    def with_group_confidence(self, confidence: float | None) -> ScoreModel:
        """This model (and its search variant) with groups' bounds at ``confidence``."""
        if confidence is not None:
            _check_confidence(confidence)
        search = (self.search.with_group_confidence(confidence) if self.search is not None
                  else None)
        return replace(self, group_confidence=confidence, search=search)

    def _all(self, kind: str | None = None, groups: bool = True) -> list[ScoreModel]:
        """The models a rate must hold for: every kind, or only ``kind`` ("single": one
        booking photo against one capture); with ``groups``, the groups' too (_in_groups)."""
        if kind is None:
            own = [self, *self.kinds.values()]
        elif kind == SINGLE:
            own = [self]
        elif kind not in self.kinds:
            raise GalleryError(f"the score model has no {kind!r} comparisons; re-run "
                               "matcher calibrate with this version")
        else:
            own = [self.kinds[kind]]
        return own + self._in_groups(kind) if groups else own

    def _in_groups(self, kind: str | None = None) -> list[ScoreModel]:
        """With the worst-group rule on, each group's models of ``kind`` (every kind if
        None; a group whose data has no such comparisons is left out of that kind)."""
        if not self.worst_group:
            return []
        return [m for g in self.groups.values()
                if kind is None or kind == SINGLE or kind in g.kinds
                for m in g._all(kind, groups=False)]

    def _group_level(self, confidence: float) -> float:
        return confidence if self.group_confidence is None else min(confidence,
                                                                     self.group_confidence)

    # -- thresholds ----------------------------------------------------------------

    def threshold_at_fmr(self, fmr: float, confidence: float | None = None,
                         kind: str | None = None) -> float:
        """The threshold that keeps one comparison's FMR <= ``fmr`` with ``confidence``
        (the model's own by default), for every comparison kind or only ``kind``; with the
        worst-group rule on, in every group too (at ``group_confidence``)."""
        c = self.confidence if confidence is None else _check_confidence(confidence)
        own = max(m._threshold(fmr, c) for m in self._all(kind, groups=False))
        in_groups = [m._threshold(fmr, self._group_level(c)) for m in self._in_groups(kind)]
        return max([own, *in_groups])

    def threshold_estimate(self, fmr: float) -> float:
        """The point estimate of that threshold (not conservative)."""
        return max(m._threshold(fmr, None) for m in self._all())

    def _threshold(self, fmr: float, confidence: float | None) -> float:
        if not 0.0 < fmr < 1.0:
            raise InvalidInput(f"a false-match rate must be in (0, 1), got {fmr}")
        if fmr >= self.tail_fmr:
            # Above the tail threshold the data is dense: the empirical curve is the answer.
            s, f = self.empirical[:, 0], self.empirical[:, 1]
            return float(np.interp(-math.log(fmr), -np.log(np.maximum(f, 1e-300)), s))
        q = fmr / self.tail_fmr
        if confidence is None:
            u, xi, sigma = self.tail
            return min(1.0, float(u + gpd_isf(q, xi, sigma)))
        u, xi, sigma = self.replicates.T
        t = np.minimum(1.0, u + gpd_isf(q, xi, sigma))
        return max(float(np.quantile(t, confidence)), self._empirical_upper(fmr, confidence))

    def _empirical_curve(self, confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """(FMR descending, threshold): the resamples' ``confidence`` quantile."""
        return self.resolved_fmr, np.quantile(self.resolved_thresholds, confidence, axis=0)

    def _empirical_upper(self, fmr: float, confidence: float) -> float:
        """The empirical bound at ``fmr``; below the resolved range, its last value (a
        stricter rate never gets a lower threshold than a looser one)."""
        if not len(self.resolved_fmr):
            return -1.0
        f, t = self._empirical_curve(confidence)
        return float(np.interp(math.log(fmr), np.log(f[::-1]), t[::-1]))

    def fmr_at(self, threshold: float) -> float:
        """Point estimate of one comparison's FMR at ``threshold`` (worst kind)."""
        return max(m._fmr_at(threshold) for m in self._all())

    def _fmr_at(self, threshold: float) -> float:
        u, xi, sigma = self.tail
        if threshold < u:
            s, f = self.empirical[:, 0], self.empirical[:, 1]
            return float(np.interp(threshold, s, f))
        return float(self.tail_fmr * gpd_sf(threshold - u, xi, sigma))

    def fmr_upper_at(self, threshold: float, confidence: float | None = None) -> float:
        """Upper confidence bound of that FMR (worst kind, and group at its level)."""
        c = self.confidence if confidence is None else _check_confidence(confidence)
        return max([*(m._fmr_upper_at(threshold, c) for m in self._all(groups=False)),
                    *(m._fmr_upper_at(threshold, self._group_level(c))
                      for m in self._in_groups())])

    def _fmr_upper_at(self, threshold: float, confidence: float) -> float:
        u, xi, sigma = self.replicates.T
        rates = [self.tail_fmr * float(gpd_sf(threshold - a, b, c)) if threshold >= a
                 else self.tail_fmr for a, b, c in zip(u, xi, sigma, strict=True)]
        bound = float(np.quantile(rates, confidence))
        if len(self.resolved_fmr):
            f, t = self._empirical_curve(confidence)  # t ascending as f descends
            if threshold <= t[-1]:
                bound = max(bound, float(np.exp(np.interp(threshold, t, np.log(f)))))
        return float(max(self._fmr_at(threshold), bound))

    def fnmr_at(self, threshold: float, kind: str | None = None
                ) -> tuple[float, float, float]:
        """(FNMR, low, high) of one genuine comparison at ``threshold`` on the data: a
        single booking photo, or ``kind`` (``fused``: two booking photos fused)."""
        m = self._all(kind or SINGLE)[0]
        s = m.genuine[:, 0]
        fnmr, low, high = (float(np.interp(threshold, s, m.genuine[:, i])) for i in (1, 2, 3))
        return fnmr, low, high

    # -- what the data supports ----------------------------------------------------

    def supports_fmr(self, fmr: float) -> bool:
        return fmr >= self.supported_floor

    @property
    def supported_floor(self) -> float:
        """The lowest per-comparison FMR every comparison kind's data supports.

        Over the whole population: a group's own floor (far higher, with a fraction of the
        people) is stated per group (``group_rates``), not folded in, so the worst-group
        rule moves thresholds but never the largest supported gallery."""
        return max(m.fmr_floor for m in self._all(groups=False))

    def max_gallery_size(self, fpir: float) -> int:
        """Largest N for which FPIR needs no per-comparison FMR below the floor."""
        return int(math.floor(fpir / self.supported_floor))

    # -- demographic groups --------------------------------------------------------

    def fmr_measured_at(self, threshold: float) -> float:
        """The fraction of this model's impostor pairs at or above ``threshold``, read off
        the stored exceedance curve: exact where the curve keeps every rank (the top pairs
        of a group), else at the next stored score above; 0 above the top pair."""
        s, f = self.empirical[:, 0], self.empirical[:, 1]
        i = int(np.searchsorted(s, threshold, side="left"))
        return float(f[i]) if i < len(s) else 0.0

    def tail_at(self, threshold: float, kind: str = SINGLE,
                confidence: float | None = None) -> dict:
        """This model's own ``kind`` comparisons (groups aside) at ``threshold``: impostor
        pairs, the FMR measured on them, the fitted tail's estimate and upper bound
        (``confidence``) and the floor of what the data supports."""
        c = self.confidence if confidence is None else _check_confidence(confidence)
        m = self._all(kind, groups=False)[0]
        return {"impostor_pairs": int(m.document.get("impostor_summary", {}).get("pairs", 0)),
                "fmr_measured": m.fmr_measured_at(threshold),
                "fmr_estimate": m._fmr_at(threshold),
                "fmr_upper": m._fmr_upper_at(threshold, c), "fmr_floor": m.fmr_floor}

    def group_rates(self, threshold: float, kind: str = SINGLE,
                    confidence: float | None = None) -> dict[str, dict]:
        """Per group, at one threshold for everyone: ``tail_at`` and the FNMR (with its
        95 % band). ``kind``: the comparison (single or fused); a group without such
        comparisons says ``kind_missing``."""
        out: dict[str, dict[str, Any]] = {}
        for name, g in self.groups.items():
            if kind != SINGLE and kind not in g.kinds:
                out[name] = {"kind_missing": True}
                continue
            fnmr, lo, hi = g.fnmr_at(threshold, kind)
            out[name] = {**g.tail_at(threshold, kind, confidence), "fnmr": fnmr,
                         "fnmr_ci95": (lo, hi)}
        return out

    # -- files ---------------------------------------------------------------------

    def to_document(self) -> dict:
        doc = {k: v for k, v in self.document.items()
               if k not in ("groups", "worst_group", "group_confidence")}
        doc.update({
            "format": FORMAT, "model_id": self.model_id, "settings_hash": self.settings_hash,
            "confidence": self.confidence, "fmr_floor": self.fmr_floor,
            "impostor_tail": {"tail_fmr": self.tail_fmr,
                              "u": self.tail[0], "xi": self.tail[1], "sigma": self.tail[2],
                              "replicates": np.round(self.replicates, 7).tolist()},
            "impostor_empirical": np.round(self.empirical, 9).tolist(),
            "impostor_resolved": {
                "fmr": self.resolved_fmr.tolist(),
                # (resamples, rates) to 5 decimals, as whole numbers of 1e-5: a quarter of
                # the file shorter, read back (divided by 1e5) to the same floats
                THRESHOLDS_E5: np.rint(self.resolved_thresholds * 1e5).astype(np.int64).tolist()},
            "genuine_fnmr": np.round(self.genuine, 6).tolist(),
        })
        if self.kinds:
            doc["kinds"] = {name: m.to_document() for name, m in self.kinds.items()}
        if self.search is not None:
            doc["search"] = self.search.to_document()
        if self.groups:
            doc["worst_group"] = self.worst_group
            doc["group_confidence"] = self.group_confidence
            doc["groups"] = {name: m.to_document() for name, m in self.groups.items()}
        return doc

    @classmethod
    def from_document(cls, doc: dict) -> ScoreModel:
        if doc.get("format") != FORMAT:
            raise GalleryError(f"score model format {doc.get('format')} is not {FORMAT}; "
                               "re-run matcher calibrate with this version")
        tail = doc["impostor_tail"]
        resolved = doc["impostor_resolved"]
        kinds = {name: cls.from_document(sub) for name, sub in doc.get("kinds", {}).items()}
        search = cls.from_document(doc["search"]) if "search" in doc else None
        groups = {name: cls.from_document(sub) for name, sub in doc.get("groups", {}).items()}
        fmr = np.asarray(resolved["fmr"], dtype=np.float64)
        if THRESHOLDS_E5 in resolved:
            thresholds = np.asarray(resolved[THRESHOLDS_E5], dtype=np.float64) / 1e5
        else:  # written before the whole-number form: decimals
            thresholds = np.asarray(resolved["thresholds"], dtype=np.float64)
        return cls(doc["model_id"], doc["settings_hash"], float(doc["confidence"]),
                   float(tail["tail_fmr"]), (tail["u"], tail["xi"], tail["sigma"]),
                   np.asarray(tail["replicates"], dtype=np.float64),
                   float(doc["fmr_floor"]),
                   np.asarray(doc["impostor_empirical"], dtype=np.float64),
                   np.asarray(doc["genuine_fnmr"], dtype=np.float64), doc, fmr,
                   thresholds.reshape(-1, len(fmr)),
                   kinds, search, groups, bool(doc.get("worst_group", False)),
                   doc.get("group_confidence"))

    def save(self, path: Path) -> None:
        """Whole or not at all: every threshold the service uses comes from this file."""
        # compact: read at every start, shipped in the package
        atomic_write_text(path, json.dumps(self.to_document(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ScoreModel:
        try:
            return cls.from_document(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise GalleryError(f"cannot read score model {path}: {exc}") from None


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise InvalidInput(f"a confidence level must be in (0, 1), got {confidence}")
    return float(confidence)


def shipped_file(model_id: str) -> str:
    """File name of a shipped score model: the model id made filesystem-safe."""
    return model_id.replace("@", "_") + ".json"


def load_score_model(model_id: str, path: str | Path | None = None) -> ScoreModel:
    """The score model in ``path``, or else the one the package ships for ``model_id``."""
    if path is not None:
        return ScoreModel.load(path)
    ref = resources.files(SHIPPED_PACKAGE) / shipped_file(model_id)
    if not ref.is_file():
        raise GalleryError(f"no score model ships for model {model_id}; derive one with "
                           "'matcher calibrate' and pass it with --score-model")
    return ScoreModel.from_document(json.loads(ref.read_text()))


def check_settings(model: ScoreModel, settings_hash: str, model_id: str,
                   gallery_model_id: str | None = None) -> None:
    """The one check that the score model, the pipeline (``model_id``, ``settings_hash``)
    and the gallery (the model its templates are of; None: not open yet) belong together:
    thresholds hold only for the pipeline they were calibrated with, on templates of its
    model (see the module docstring)."""
    if (model.model_id, model.settings_hash) == (model_id, settings_hash) \
            and gallery_model_id in (None, model_id):
        return
    gallery = "" if gallery_model_id is None else f", the gallery holds {gallery_model_id}"
    raise GalleryError(
        f"the score model was calibrated for {model.model_id} with pipeline settings "
        f"{model.settings_hash}, the served pipeline is {model_id} with {settings_hash}"
        f"{gallery}: its thresholds would not hold. Re-calibrate with 'matcher calibrate "
        "--labels DIR --out FILE' and serve with --score-model FILE (or restore the "
        "calibrated settings); a gallery is served only by the model it was enrolled with")
