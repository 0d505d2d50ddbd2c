"""Demographic groups: labels.csv's optional group column, and within-group score models
fitted as the population's, so every threshold can also hold in the worst group
(docs/demographics.md)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InvalidInput
from .fit import BOOTSTRAP, CONFIDENCE, fit_with_kinds

GROUP_COLUMN = "group"


def read_groups(folder: Path) -> dict[str, str]:
    """identity -> group from labels.csv's optional ``group`` column; {} without one.

    One group per person (a person's rows must agree); an empty cell is no group: that
    person counts in the population figures and in no group's."""
    path = Path(folder) / "labels.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if GROUP_COLUMN not in (reader.fieldnames or []):
            return {}
        groups: dict[str, str] = {}
        for r in reader:
            who, group = r["identity"], (r[GROUP_COLUMN] or "").strip()
            if groups.setdefault(who, group) != group:
                raise InvalidInput(f"{path}: {who!r} is in group {groups[who]!r} and "
                                   f"{group!r}; give each person one group")
    return {who: g for who, g in groups.items() if g}


# A group is reported, and may set thresholds, when its own tail can be fitted (the
# impostor and genuine pairs fit_score_model needs of any data) and it has at least this
# many people. Random groups show from what size a group's identity-bootstrap interval is
# sound (benchmarks/_demographics.py, demo_group_size_coverage_*; docs/demographics.md,
# "Which groups"); the floor is set above it because a group's threshold rests on its
# tail, whose units are pairs of people: a few people with many photos leave one family
# or one mislabelled photo as the tail.
MIN_GROUP_PEOPLE = 30
# The worst-group rule takes each group's threshold at this confidence (the median over its
# identity resamples) and states the 95 % bound beside it: a group's bound is set by
# resamples that repeat one or two of its people (one look-alike pair can push it past
# every genuine score), and the maximum over several groups is biased upward already (the
# largest of several noisy estimates). docs/demographics.md has the figures.
GROUP_CONFIDENCE = 0.5


def group_of_rows(identities: np.ndarray, groups: dict[str, str]) -> np.ndarray:
    """(n,) str: each row's group ("" for none)."""
    return np.array([groups.get(str(who), "") for who in identities], dtype=object).astype(str)


def fit_groups(templates: np.ndarray, identities: np.ndarray, groups: dict[str, str],
               model_id: str, settings_hash: str, *, drop: Sequence[dict] = (),
               bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE, seed: int = 0,
               min_people: int = MIN_GROUP_PEOPLE) -> tuple[dict, dict[str, str]]:
    """({group: within-group ScoreModel}, {group: why it has none}).

    Each model is fitted exactly as the population's (fit_with_kinds) to the pairs of two
    people of one group: its tail, bootstrap and floor say what that group's data shows,
    and how far any rate beyond it is extrapolated. templates (n, 512) of the capped
    usable rows; ``drop``: identity pairs to leave out (label noise, look-alikes)."""
    of_row = group_of_rows(identities, groups)
    fitted, skipped = {}, {}
    for name in sorted(set(groups.values())):
        mask = of_row == name
        people = len(np.unique(identities[mask]))
        if people < min_people:
            skipped[name] = f"{people} people with a usable photo, fewer than {min_people}"
            continue
        try:
            fitted[name] = fit_with_kinds(
                templates[mask], identities[mask], model_id, settings_hash, drop=drop,
                bootstrap=bootstrap, confidence=confidence, seed=seed, fused_optional=True,
                document={"group": {"name": name, "people": people,
                                    "photos": int(mask.sum())}})
        except InvalidInput as exc:
            skipped[name] = str(exc)
    return fitted, skipped


def attach_groups(model, templates: np.ndarray, identities: np.ndarray,
                  groups: dict[str, str], *, drop: Sequence[dict] = (), apart: Sequence[dict] = (),
                  worst_group: bool = True, group_confidence: float | None = GROUP_CONFIDENCE,
                  bootstrap: int = BOOTSTRAP, seed: int = 0, min_people: int = MIN_GROUP_PEOPLE):
    """``model`` with within-group models (its search variant too, look-alikes ``apart``
    there as in the population's), the worst-group rule on or off and each group's bound
    at ``group_confidence`` (None: the threshold's own): (model, skipped)."""
    fitted, skipped = fit_groups(templates, identities, groups, model.model_id,
                                 model.settings_hash, drop=drop, bootstrap=bootstrap,
                                 confidence=model.confidence, seed=seed, min_people=min_people)
    search = model.search
    if search is not None:
        apart_fitted, _ = fit_groups(templates, identities, groups, model.model_id,
                                     model.settings_hash, drop=list(drop) + list(apart),
                                     bootstrap=bootstrap, confidence=model.confidence,
                                     seed=seed, min_people=min_people)
        search = replace(search, groups=apart_fitted)
    model = replace(model, groups=fitted, search=search).with_worst_group(
        worst_group).with_group_confidence(group_confidence)
    level = ("the threshold's own confidence" if group_confidence is None else
             f"confidence {group_confidence:g} (at most the threshold's own)")
    model.document.setdefault("method", {})["groups"] = (
        f"within-group models for groups of >= {min_people} people; worst-group rule "
        + (f"on: every threshold also holds in each group, at {level}" if model.worst_group
           else "off"))
    return model, skipped


