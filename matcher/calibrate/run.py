"""The whole ``matcher calibrate`` run: a labelled folder -> templates -> pairs -> label
noise -> the population's score model (and the groups', where labels.csv names them),
with the report written beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..durable import atomic_write_text
from ..errors import InvalidInput
from ..face.pipeline import Pipeline
from ..gallery.scoremodel import FUSED, SINGLE
from .embedding import LOW_QUALITY, NO_FACE, OK, UNREADABLE, Embedded, embed_folder
from .fit import BOOTSTRAP, fit_population
from .groups import GROUP_COLUMN, GROUP_CONFIDENCE, MIN_GROUP_PEOPLE, attach_groups, read_groups
from .noise import label_noise
from .pairs import (
    MAX_PHOTOS_PER_PERSON,
    PairScores,
    capped_rows,
    drop_identity_pairs,
    fused_pairs,
    score_pairs,
)
from .report import group_report


def source_summary(folder: Path, embedded: Embedded, pairs: PairScores) -> dict:
    """Where a score model's data came from, for the file's ``source`` section."""
    counts = {s: int((embedded.status == s).sum()) for s in (OK, LOW_QUALITY, NO_FACE,
                                                              UNREADABLE)}
    reasons: dict[str, int] = {}
    for r in embedded.reasons[embedded.status == LOW_QUALITY]:
        for code in r.split(";"):
            reasons[code] = reasons.get(code, 0) + 1
    return {
        "folder": Path(folder).name,
        "labels_sha256": embedded.labels_sha256,
        "photos": int(len(embedded.files)),
        "identities": int(len(np.unique(embedded.identities))),
        "photo_outcomes": counts,
        "quality_refusals_by_reason": dict(sorted(reasons.items())),
        "face_choice": "the detected face nearest the image centre",
        "max_photos_per_person": MAX_PHOTOS_PER_PERSON,
        "identities_used": int((pairs.photos_per_identity > 0).sum()),
        "genuine_pairs": int(len(pairs.genuine)),
        "impostor_pairs": pairs.impostor_pairs,
        "impostor_identity_pairs": pairs.identity_pairs,
    }


def write_json(path: Path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=1, sort_keys=False) + "\n")



# Identity pairs scoring in the genuine range that nothing shows to be one person
# (relatives, twins, look-alikes) are left out of the tail 1:N thresholds come from, and
# listed: with them in, 1:N thresholds rise above most genuine travellers and still do not
# separate them. The cross-validation of `matcher bench --only accuracy` chose this
# (docs/operating-points.md). 1:1 keeps them: a relative with the traveller's passport is
# the impostor a 1:1 check exists for.
LOOK_ALIKES_APART = True


def calibrate(folder: Path, pipeline: Pipeline, *, cache_dir: Path | None = None,
              bootstrap: int = BOOTSTRAP, seed: int = 0, workers: int = 2,
              look_alikes_apart: bool = LOOK_ALIKES_APART, worst_group: bool | None = None,
              group_confidence: float | None = GROUP_CONFIDENCE,
              min_group_people: int = MIN_GROUP_PEOPLE):
    """The whole ``matcher calibrate`` run: (ScoreModel, report dict).

    With a ``group`` column in labels.csv the model also holds within-group models and the
    report their rates (group_report); ``worst_group`` (default: on where groups are given)
    makes every threshold hold in the worst group too."""
    import datetime

    folder = Path(folder)
    groups = read_groups(folder)
    if worst_group and not groups:
        raise InvalidInput(f"the worst-group rule needs a '{GROUP_COLUMN}' column in "
                           f"{folder / 'labels.csv'}")
    embedded = embed_folder(folder, pipeline, cache_dir, workers)
    rows = capped_rows(embedded.identities, embedded.usable())
    pairs = score_pairs(embedded.templates[rows], embedded.identities[rows])
    by_identity: dict[str, list[str]] = {}
    for i in rows:
        by_identity.setdefault(str(embedded.identities[i]), []).append(str(embedded.files[i]))
    genuine_floor = float(np.quantile(pairs.genuine, 0.05)) if len(pairs.genuine) else 1.0
    noise = label_noise(pairs, genuine_floor, folder, by_identity)
    source = source_summary(folder, embedded, drop_identity_pairs(pairs, noise["dropped"]))
    source["label_noise_dropped"] = noise["dropped"]
    apart = noise["look_alikes"] if look_alikes_apart else []
    source["look_alikes_apart"] = apart
    document = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": pipeline.score_settings(),
        "source": source,
    }
    templates, identities = embedded.templates[rows], embedded.identities[rows]
    model = fit_population(templates, identities, pipeline.model_id, pipeline.settings_hash(),
                           dropped=noise["dropped"], apart=apart, bootstrap=bootstrap,
                           seed=seed, document=document,
                           raw={SINGLE: pairs, FUSED: fused_pairs(templates, identities)})
    report: dict[str, Any] = {"source": source, "label_noise": noise,
                              "genuine_floor_for_noise": round(genuine_floor, 4)}
    if groups:
        model, skipped = attach_groups(
            model, templates, identities, groups, drop=noise["dropped"], apart=apart,
            worst_group=worst_group is not False, group_confidence=group_confidence,
            bootstrap=bootstrap, seed=seed, min_people=min_group_people)
        report["groups"] = group_report(
            model, templates, identities, groups, drop=noise["dropped"], apart=apart,
            skipped=skipped, bootstrap=bootstrap, seed=seed, min_people=min_group_people)
        source["groups"] = {k: report["groups"][k] for k in
                            ("column", "min_people", "people", "reported", "not_reported",
                             "worst_group", "group_confidence")}
    return model, report
