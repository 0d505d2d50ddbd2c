"""Which face of a booking photo is enrolled (issue 25), measured on lfw-dev.

Every photo through the served pipeline, every face kept (template, box, quality). The
labelled person's face in a photo with two or more faces is the one that matches the
person's other photos (median over those photos of the best cosine with any of their
faces at least ``TRUTH_GENUINE``, every other face of the photo under
``TRUTH_IMPOSTOR``); photos of people with one photo, or where this does not single out
one face, are left out of the wrong-subject counts. LFW's own construction puts the
labelled person at the image centre (lfw-dev's README): the figure
``truth_is_central`` says how far that holds here, and why centrality is a strong cue on
this data, stronger than on a traveller's street selfie.

Reported, each with its exact 95 % interval (photos, then bookings, are the unit):
- single-photo rules (the area ratio alone at several thresholds; largest and central;
  the shipped rule) over every photo with two or more faces: failure to enrol and
  wrong-subject rate, the curve the rule is picked from;
- the consistency threshold: two photos of one person refused as ``photos_disagree``
  versus two different people's photos accepted as one traveller, against the cosine, with
  the score model's threshold at the FMR the service asks of it;
- the shipped rule (matcher.face.enrolment.choose_faces) on one-photo bookings (every
  photo), two-photo bookings (two photos of a person) and mixed bookings (one photo each
  of two people).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matcher.calibrate.embedding import read_labels
from matcher.calibrate.pairs import MAX_PHOTOS_PER_PERSON
from matcher.face.enrolment import (
    BookingPhoto,
    EnrolmentRule,
    choose_faces,
    main_face,
)
from matcher.face.pipeline import Face, Pipeline
from matcher.face.quality import Quality

from ._binomial import clopper_pearson
from ._lfw import quick_subset
from .harness import Report

log = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "matcher" / "enrolment"
TRUTH_GENUINE = 0.30
TRUTH_IMPOSTOR = 0.20
AREA_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
THRESHOLDS = np.round(np.arange(0.10, 0.46, 0.02), 2)
MIXED_BOOKINGS = 100_000
QUICK_IDENTITIES = 150
SEED = 0


@dataclass
class AllFaces:
    """Every face of every photo: ``photo`` (f,) the row in labels.csv of each face."""

    files: np.ndarray          # (n,) str
    identities: np.ndarray     # (n,) str
    shapes: np.ndarray         # (n, 2) full-size (height, width)
    photo: np.ndarray          # (f,) int
    boxes: np.ndarray          # (f, 4)
    accepted: np.ndarray       # (f,) bool: passes the quality gate
    reasons: np.ndarray        # (f,) str, '+'-joined
    templates: np.ndarray      # (f, 512)

    def faces_of(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.photo == i)


def all_faces(folder: Path, pipeline: Pipeline) -> AllFaces:
    """Every face of every labelled photo, cached per labels and pipeline settings."""
    rows = read_labels(folder)
    key = hashlib.sha256((folder / "labels.csv").read_bytes()).hexdigest()[:12]
    cache = CACHE / f"faces-{key}-{pipeline.settings_hash()[:12]}.npz"
    if cache.exists():
        z = np.load(cache)
        return AllFaces(**{k: z[k] for k in z.files})
    shapes, photo, boxes, accepted, reasons, templates = [], [], [], [], [], []
    started = time.monotonic()
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        decoded = [pipeline.decode_scaled((folder / f).read_bytes()) for f, _ in chunk]
        for n, (image, faces) in enumerate(zip(decoded, pipeline.analyse_many(decoded),
                                               strict=True)):
            shapes.append(image.shape[:2])
            for face in faces:
                photo.append(start + n)
                boxes.append(face.bbox[:4])
                accepted.append(face.quality.accepted)
                reasons.append("+".join(face.quality.reasons))
                templates.append(face.template)
        if start % 1600 == 0:
            log.info("all faces: %d/%d photos (%.0f s)", start, len(rows),
                     time.monotonic() - started)
    out = AllFaces(np.array([f for f, _ in rows]), np.array([w for _, w in rows]),
                   np.array(shapes, np.int64), np.array(photo, np.int64),
                   np.array(boxes, np.float32).reshape(-1, 4), np.array(accepted, bool),
                   np.array(reasons, dtype=str), np.array(templates, np.float32))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out.__dict__)
    return out


def _faces(data: AllFaces, i: int) -> list[Face]:
    """Photo ``i``'s faces as the pipeline gave them (quality reduced to its verdict)."""
    out = []
    for f in data.faces_of(i):
        quality = Quality(1.0, 0, 0, 0, 0, 0, 0, 0, False,
                          tuple(r for r in str(data.reasons[f]).split("+") if r))
        out.append(Face(data.boxes[f], np.zeros((5, 2), np.float32), 1.0, quality,
                        data.templates[f]))
    return out


def labelled_faces(data: AllFaces, people: dict[str, list[int]]) -> dict[int, int]:
    """Photo -> the labelled person's face, for photos with two or more faces where the
    person's other photos single it out (module docstring)."""
    truth = {}
    for photos in people.values():
        for i in photos:
            mine = data.faces_of(i)
            others = [data.faces_of(j) for j in photos if j != i and len(data.faces_of(j))]
            if len(mine) < 2 or not others:
                continue
            support = np.array([np.median([np.max(data.templates[o] @ data.templates[f])
                                           for o in others]) for f in mine])
            order = np.argsort(-support)
            if support[order[0]] >= TRUTH_GENUINE and support[order[1]] < TRUTH_IMPOSTOR:
                truth[i] = int(mine[order[0]])
    return truth


def _rate(report: Report, key: str, k: int, n: int, note: str, summary: bool = False) -> None:
    lo, hi = clopper_pearson(k, n) if n else (0.0, 1.0)
    report.figure(key, k / n if n else 0.0, "fraction", summary=summary,
                  note=f"{k} of {n}; 95 % interval [{lo:.2e}, {hi:.2e}]. {note}")


def enrolment_accuracy(report: Report, folder: Path, consistency_threshold: float,
                       consistency_fmr: float, quick: bool = False) -> dict:
    """The measurements of the module docstring; returns what the plot draws. ``quick``:
    QUICK_IDENTITIES people drawn with a fixed seed (that it runs, not what it finds)."""
    if quick:
        folder = quick_subset(folder, QUICK_IDENTITIES)
    data = all_faces(folder, Pipeline(threads=2))
    people: dict[str, list[int]] = {}
    for i, who in enumerate(data.identities.tolist()):
        if len(people.setdefault(who, [])) < MAX_PHOTOS_PER_PERSON:
            people[who].append(i)
    rows = [i for p in people.values() for i in p]
    counts = np.bincount(data.photo, minlength=len(data.files))
    multi = [i for i in rows if counts[i] >= 2]
    truth = labelled_faces(data, people)
    central = sum(_nearest_centre(data, i) == truth[i] for i in truth)
    report.param(enrolment_photos=len(rows), enrolment_people=len(people),
                 enrolment_multi_face_photos=len(multi),
                 enrolment_labelled_faces_resolved=len(truth),
                 enrolment_consistency_threshold=round(consistency_threshold, 4),
                 enrolment_consistency_fmr=consistency_fmr)
    report.figure("enrolment_multi_face_share", len(multi) / len(rows), "fraction",
                  note="photos with two or more faces")
    report.figure("enrolment_truth_is_central", central / max(1, len(truth)), "fraction",
                  note=f"{central} of {len(truth)} resolved labelled faces are the face "
                       "nearest the centre (LFW is cropped around the labelled person)")
    curve = _single_photo_rules(report, data, multi, truth, len(rows))
    consistency = _consistency_curve(report, data, people, consistency_threshold)
    _shipped_rule(report, data, people, rows, truth, consistency_threshold)
    return {"single": curve, "consistency": consistency,
            "threshold": consistency_threshold}


def _nearest_centre(data: AllFaces, i: int) -> int:
    faces = data.faces_of(i)
    b = data.boxes[faces]
    h, w = data.shapes[i]
    d = np.hypot((b[:, 0] + b[:, 2]) / 2 - w / 2, (b[:, 1] + b[:, 3]) / 2 - h / 2)
    return int(faces[np.argmin(d)])


def _single_photo_rules(report: Report, data: AllFaces, multi: list[int],
                        truth: dict[int, int], photos: int) -> list[dict]:
    """Each candidate single-photo rule over the photos with two or more faces."""
    areas = (data.boxes[:, 2] - data.boxes[:, 0]) * (data.boxes[:, 3] - data.boxes[:, 1])
    largest, ratio, is_central = {}, {}, {}
    for i in multi:
        faces = data.faces_of(i)
        order = faces[np.argsort(-areas[faces])]
        largest[i] = int(order[0])
        ratio[i] = float(areas[order[1]] / areas[order[0]])
        is_central[i] = _nearest_centre(data, i) == largest[i]
    rules = {f"area<{r:g}": (lambda i, r=r: ratio[i] < r) for r in AREA_RATIOS}
    rules["largest_and_central"] = lambda i: is_central[i]
    rules["shipped"] = lambda i: main_face(BookingPhoto(_faces(data, i),
                                                        tuple(data.shapes[i]))) is not None
    curve = []
    for name, enrols in rules.items():
        enrolled = [i for i in multi if enrols(i)]
        judged = [i for i in enrolled if i in truth]
        wrong = sum(largest[i] != truth[i] for i in judged)
        refused = len(multi) - len(enrolled)
        curve.append({"rule": name, "refused_share_of_photos": refused / photos,
                      "wrong": wrong, "judged": len(judged)})
        key = name.replace("<", "_lt_").replace(".", "p")
        _rate(report, f"enrolment_single_{key}_refused", refused, photos,
              "one-photo booking refusals this rule adds (of all photos)",
              summary=name == "shipped")
        _rate(report, f"enrolment_single_{key}_wrong_subject", wrong, len(judged),
              "enrolled face is not the labelled person (photos with 2+ faces whose "
              "labelled face is resolved)", summary=name == "shipped")
    return curve


def _best_pair(data: AllFaces, a: int, b: int) -> float:
    fa, fb = data.faces_of(a), data.faces_of(b)
    return float(np.max(data.templates[fa] @ data.templates[fb].T))


def _consistency_curve(report: Report, data: AllFaces, people: dict[str, list[int]],
                       threshold: float) -> dict:
    """Best-pair cosine of two photos of one person (each pair of a person's photos) and
    of two people (random pairs of photos of different people)."""
    genuine = np.array([_best_pair(data, a, b) for p in people.values()
                        for n, a in enumerate(p) for b in p[n + 1:]
                        if len(data.faces_of(a)) and len(data.faces_of(b))])
    rng = np.random.default_rng(SEED)
    names = [n for n, p in people.items() if any(len(data.faces_of(i)) for i in p)]
    mixed = []
    for _ in range(MIXED_BOOKINGS):
        x, y = rng.choice(len(names), 2, replace=False)
        a = int(rng.choice(people[names[x]]))
        b = int(rng.choice(people[names[y]]))
        if len(data.faces_of(a)) and len(data.faces_of(b)):
            mixed.append(_best_pair(data, a, b))
    impostor = np.array(mixed)
    refused = [float(np.mean(genuine < t)) for t in THRESHOLDS]
    passed = [float(np.mean(impostor >= t)) for t in THRESHOLDS]
    _rate(report, "enrolment_consistency_genuine_refused", int(np.sum(genuine < threshold)),
          len(genuine), "pairs of photos of one person below the consistency threshold")
    _rate(report, "enrolment_consistency_mixed_accepted", int(np.sum(impostor >= threshold)),
          len(impostor), "photos of two different people reaching it (best face pair)")
    return {"thresholds": THRESHOLDS.tolist(), "genuine_refused": refused,
            "mixed_accepted": passed}


def _shipped_rule(report: Report, data: AllFaces, people: dict[str, list[int]],
                  rows: list[int], truth: dict[int, int], threshold: float) -> None:
    """choose_faces itself, on one-photo, two-photo and mixed bookings."""
    rule = EnrolmentRule(threshold)
    faces = {i: _faces(data, i) for i in rows}

    def booking(photos: list[int]) -> list:
        return choose_faces([BookingPhoto(faces[i], tuple(data.shapes[i])) for i in photos],
                            rule)

    def wrong(i: int, verdict) -> int:
        if verdict.face is None or i not in truth:
            return 0
        return int(not np.array_equal(verdict.face.template, data.templates[truth[i]]))

    def judged(i: int, verdict) -> int:
        return int(verdict.face is not None and i in truth)

    refused_one = wrong_one = judged_one = 0
    reasons: dict[str, int] = {}
    for i in rows:
        (v,) = booking([i])
        refused_one += v.face is None
        if v.face is None:
            code = v.reason.split(":", 1)[0]
            reasons[code] = reasons.get(code, 0) + 1
        wrong_one += wrong(i, v)
        judged_one += judged(i, v)
    _rate(report, "enrolment_one_photo_refused", refused_one, len(rows),
          f"one-photo bookings refused, by reason {dict(sorted(reasons.items()))}",
          summary=True)
    _rate(report, "enrolment_one_photo_wrong_subject", wrong_one, judged_one,
          "enrolled photos with 2+ faces whose enrolled face is not the labelled person",
          summary=True)
    refused_two = partial = wrong_two = judged_two = bookings = 0
    for p in people.values():
        for n in range(0, len(p) - 1, 2):  # disjoint pairs: each photo in one booking
            verdicts = booking(p[n:n + 2])
            bookings += 1
            enrolled = [v for v in verdicts if v.face is not None]
            refused_two += not enrolled
            partial += len(enrolled) == 1
            for i, v in zip(p[n:n + 2], verdicts, strict=True):
                wrong_two += wrong(i, v)
                judged_two += judged(i, v)
    _rate(report, "enrolment_two_photo_refused", refused_two, bookings,
          f"two-photo bookings of one person with no photo enrolled ({partial} enrolled "
          "from one photo of the two)", summary=True)
    _rate(report, "enrolment_two_photo_wrong_subject", wrong_two, judged_two,
          "as for one photo, in two-photo bookings")
    rng = np.random.default_rng(SEED + 1)
    names = list(people)
    mixed = accepted = 0
    for _ in range(20_000):
        x, y = rng.choice(len(names), 2, replace=False)
        verdicts = booking([int(rng.choice(people[names[x]])), int(rng.choice(people[names[y]]))])
        mixed += 1
        accepted += all(v.face is not None for v in verdicts)
    _rate(report, "enrolment_mixed_accepted", accepted, mixed,
          "bookings of one photo each of two different people enrolled as one traveller",
          summary=True)


def plot(ax_single, ax_consistency, measured: dict) -> None:
    """The two curves the rule is picked from."""
    for point in measured["single"]:
        wrong = point["wrong"] / max(1, point["judged"])
        ax_single.scatter(point["refused_share_of_photos"] * 100, wrong * 100, s=14)
        ax_single.annotate(point["rule"], (point["refused_share_of_photos"] * 100, wrong * 100),
                           fontsize=6)
    ax_single.set_xlabel("one-photo bookings refused for their second face (% of photos)")
    ax_single.set_ylabel("wrong subject enrolled (% of judged)")
    ax_single.set_title("single-photo rules (lfw-dev)", fontsize=9)
    c = measured["consistency"]
    ax_consistency.semilogy(c["thresholds"], np.maximum(c["genuine_refused"], 1e-5),
                            label="one person's two photos refused")
    ax_consistency.semilogy(c["thresholds"], np.maximum(c["mixed_accepted"], 1e-5),
                            label="two people's photos accepted")
    ax_consistency.axvline(measured["threshold"], ls="--", c="k", lw=0.8,
                           label="shipped consistency threshold")
    ax_consistency.set_xlabel("best-face-pair cosine threshold")
    ax_consistency.set_title("cross-photo consistency (lfw-dev)", fontsize=9)
    ax_consistency.legend(fontsize=7)
