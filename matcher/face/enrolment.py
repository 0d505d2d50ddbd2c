"""Which face of each booking photo is the traveller's, and why a photo is refused.

One rule for both ways a traveller is enrolled: the overnight re-index
(matcher.reindex.job) and the Enroll / EnrollStream RPCs (matcher.service.outcome). Both
call ``choose_faces`` with every photo of one booking and get one verdict per photo; the
usable photos are enrolled, the others are refused with a stable reason code (written to
the re-index's rejects file, answered per photo by Enroll).

How the traveller's face is found (measured on lfw-dev: docs/operating-points.md#enrolment,
``matcher bench --only accuracy``):

* **Across photos**, the traveller is the face the booking's photos share: the faces
  chosen (one per photo) must each reach ``consistency_threshold`` in mean cosine with
  the others. The photo set covered by the most consistent faces wins; when two people
  appear together in the same photos, the single-photo rule below breaks the tie, and a
  tie it cannot break refuses those photos (``multiple_faces``). A photo whose faces match
  none of the chosen ones is refused (``inconsistent_face``); when no face recurs and two
  or more photos each show one lone face, the booking shows different people and is
  refused whole (``photos_disagree``): never trimmed to one of them.
* **One photo** (or one usable photo): the largest face, when it is also clearly the face
  nearest the image centre (at most half as far from it as any other) or at least
  ``1 / dominant_area_ratio`` times the area of every other face. Otherwise whose
  booking it is cannot be told (``multiple_faces``).
* The chosen face must pass the quality gate (``low_quality:<reasons>``) unless
  ``accept_low_quality`` (Enroll's operator override). A photo without a face is
  ``no_face``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Protocol

import numpy as np

# Stable reason codes; a detail may follow after ':' (low_quality:<reasons joined by '+'>).
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
LOW_QUALITY = "low_quality"
INCONSISTENT_FACE = "inconsistent_face"
PHOTOS_DISAGREE = "photos_disagree"

# A largest face at least twice the area of every other face is the photo's subject
# wherever it stands; otherwise it must also be the face nearest the centre.
DOMINANT_AREA_RATIO = 0.5
# "Nearest the centre" must be clear: at most half as far from it as any other face (two
# people side by side in the middle of a photo are not told apart by position).
CENTRAL_DISTANCE_RATIO = 0.5


class FaceQuality(Protocol):
    @property
    def accepted(self) -> bool: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...


class Face(Protocol):
    """What the rule reads of a face (matcher.face.pipeline.Face, or a GivenFace)."""

    @property
    def bbox(self) -> np.ndarray: ...
    @property
    def area(self) -> float: ...
    @property
    def quality(self) -> FaceQuality: ...
    @property
    def template(self) -> np.ndarray: ...


@dataclass(frozen=True)
class QualityVerdict:
    """A quality gate's verdict alone (what a GivenFace carries)."""

    accepted: bool = True
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class GivenFace:
    """A face known by its values: a template sent to Enroll or already stored (the caller
    vouches for it: it passes the quality gate), or a face a re-index worker sent back."""

    template: np.ndarray
    bbox: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    area: float = 1.0
    quality: FaceQuality = field(default_factory=QualityVerdict)


@dataclass(frozen=True)
class BookingPhoto:
    """What the rule sees of one booking photo: its faces and its full-size (height, width).
    A template already enrolled for the traveller is a photo of one face with
    ``enrolled=True``: it takes part in the consistency check and is never refused alone."""

    faces: Sequence[Face]
    shape: tuple[int, int]
    enrolled: bool = False


@dataclass(frozen=True)
class PhotoVerdict:
    """The face enrolled from one photo, or None and the reason it is refused."""

    face: Face | None
    reason: str = ""


@dataclass(frozen=True)
class EnrolmentRule:
    """The rule's settings. ``consistency_threshold`` comes from the score model (the
    cosine two photos of one person reach; docs/operating-points.md#enrolment)."""

    consistency_threshold: float
    dominant_area_ratio: float = DOMINANT_AREA_RATIO
    accept_low_quality: bool = False

    def __post_init__(self) -> None:
        if not -1.0 < self.consistency_threshold < 1.0:
            raise ValueError("consistency_threshold must be a cosine in (-1, 1)")
        if not 0.0 < self.dominant_area_ratio <= 1.0:
            raise ValueError("dominant_area_ratio must be in (0, 1]")


def main_face(photo: BookingPhoto, dominant_area_ratio: float = DOMINANT_AREA_RATIO
              ) -> Face | None:
    """The single-photo rule: the photo's subject, or None when it has no face or the
    subject cannot be told (two cues, size and position, point at different faces)."""
    faces = list(photo.faces)
    if not faces:
        return None
    largest = max(faces, key=lambda f: f.area)
    if len(faces) == 1:
        return largest
    if all(f is largest or f.area < dominant_area_ratio * largest.area for f in faces):
        return largest
    height, width = photo.shape

    def off_centre(f: Face) -> float:
        x1, y1, x2, y2 = (float(v) for v in f.bbox[:4])
        return float(np.hypot((x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2))

    own = off_centre(largest)
    clearly_central = all(f is largest or own <= CENTRAL_DISTANCE_RATIO * off_centre(f)
                          for f in faces)
    return largest if clearly_central else None


def choose_faces(photos: Sequence[BookingPhoto], rule: EnrolmentRule) -> list[PhotoVerdict]:
    """One verdict per photo of one booking, in order (see the module docstring)."""
    chosen = _identify_traveller(photos, rule)
    verdicts = []
    for photo, pick in zip(photos, chosen, strict=True):
        if isinstance(pick, str):
            verdicts.append(PhotoVerdict(None, pick))
        elif not pick.quality.accepted and not rule.accept_low_quality and not photo.enrolled:
            verdicts.append(PhotoVerdict(None, f"{LOW_QUALITY}:{'+'.join(pick.quality.reasons)}"))
        else:
            verdicts.append(PhotoVerdict(pick))
    return verdicts


def _identify_traveller(photos: Sequence[BookingPhoto], rule: EnrolmentRule
                        ) -> list[Face | str]:
    """Per photo: the traveller's face, or the reason code it has none."""
    out: list[Face | str] = [NO_FACE if not p.faces else MULTIPLE_FACES for p in photos]
    usable = [i for i, p in enumerate(photos) if p.faces]
    if len(usable) == 1:
        i = usable[0]
        face = main_face(photos[i], rule.dominant_area_ratio)
        out[i] = face if face is not None else MULTIPLE_FACES
        return out
    if not usable:
        return out
    anchors = [i for i in usable if photos[i].enrolled]
    if anchors:
        return _against_enrolled(photos, usable, anchors, rule.consistency_threshold, out)
    tracks = _tracks(photos, usable, rule.consistency_threshold)
    if tracks:
        track = _best_track(tracks, photos, rule.dominant_area_ratio)
        if track is None:  # two people share the same photos and neither is the subject
            return out
        for i in usable:
            out[i] = photos[i].faces[track[i]] if i in track else INCONSISTENT_FACE
        return out
    # No face recurs across photos.
    lone = [i for i in usable if len(photos[i].faces) == 1]
    if len(lone) >= 2:
        for i in usable:
            out[i] = PHOTOS_DISAGREE
        return out
    for i in usable:
        out[i] = INCONSISTENT_FACE
    if lone:  # one lone face, the rest group photos without it: the lone one is the subject
        out[lone[0]] = photos[lone[0]].faces[0]
    return out


def _against_enrolled(photos: Sequence[BookingPhoto], usable: list[int], anchors: list[int],
                      threshold: float, out: list[Face | str]) -> list[Face | str]:
    """A traveller already enrolled: each new photo gives its face with the best mean cosine
    to the enrolled templates, if that reaches ``threshold``."""
    enrolled = np.stack([photos[i].faces[0].template for i in anchors])
    for i in usable:
        if photos[i].enrolled:
            out[i] = photos[i].faces[0]
            continue
        mean = (np.stack([f.template for f in photos[i].faces]) @ enrolled.T).mean(axis=1)
        best = int(np.argmax(mean))
        out[i] = (photos[i].faces[best] if mean[best] >= threshold else
                  PHOTOS_DISAGREE if len(photos[i].faces) == 1 else INCONSISTENT_FACE)
    return out


def _tracks(photos: Sequence[BookingPhoto], usable: list[int], threshold: float
            ) -> list[dict[int, int]]:
    """Every consistent set of faces (photo index -> face index) grown from a pair of faces
    of two photos that reach ``threshold``: each other photo adds its face with the best
    mean cosine to the set's faces, if that reaches ``threshold``."""
    templates = {i: np.stack([f.template for f in photos[i].faces]) for i in usable}
    tracks: list[dict[int, int]] = []
    seen: set[tuple[tuple[int, int], ...]] = set()
    for a, b in combinations(usable, 2):
        scores = templates[a] @ templates[b].T
        for fa, fb in zip(*np.nonzero(scores >= threshold), strict=True):
            if any(t.get(a) == fa and t.get(b) == fb for t in tracks):
                continue  # grown already: a track holding both faces
            track = {a: int(fa), b: int(fb)}
            for c in usable:
                if c in track:
                    continue
                mean = np.mean([templates[c] @ templates[p][f] for p, f in track.items()],
                               axis=0)
                best = int(np.argmax(mean))
                if mean[best] >= threshold:
                    track[c] = best
            key = tuple(sorted(track.items()))
            if key not in seen:
                seen.add(key)
                tracks.append(track)
    return tracks


def _best_track(tracks: list[dict[int, int]], photos: Sequence[BookingPhoto],
                dominant_area_ratio: float) -> dict[int, int] | None:
    """The track covering the most photos; among those that pick different faces, the one
    made of more photos' main faces. None when that does not decide."""
    most = max(len(t) for t in tracks)
    widest = [t for t in tracks if len(t) == most]
    if len({tuple(sorted(t.items())) for t in widest}) == 1:
        return widest[0]
    mains = {i: main_face(photos[i], dominant_area_ratio) for t in widest for i in t}

    def made_of_mains(track: dict[int, int]) -> int:
        return sum(mains[i] is photos[i].faces[f] for i, f in track.items())

    ranked = sorted(widest, key=made_of_mains, reverse=True)
    if made_of_mains(ranked[0]) > made_of_mains(ranked[1]):
        return ranked[0]
    return None


def explain(reason: str) -> str:
    """A reject reason as an operator reads it: the code, then what it means and what to do.

    e.g. ``multiple_faces (whose booking it is cannot be told: ...)``.
    """
    code, _, detail = reason.partition(":")
    if code == NO_FACE:
        return f"{reason} (no face found; send a photo showing the traveller's face)"
    if code == MULTIPLE_FACES:
        return (f"{reason} (several faces and whose booking it is cannot be told; send a "
                f"photo of the traveller alone, or with another photo of them)")
    if code == LOW_QUALITY:
        return (f"{reason} (the face fails the quality gate: {detail.replace('+', ', ')}; "
                f"retake it or set accept_low_quality)")
    if code == INCONSISTENT_FACE:
        return (f"{reason} (no face in this photo matches the traveller's other photos; "
                f"send a photo of the same traveller)")
    if code == PHOTOS_DISAGREE:
        return (f"{reason} (the photos show different people; send photos of one "
                f"traveller only)")
    return reason
