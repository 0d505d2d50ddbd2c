"""Which face of a booking photo is enrolled, and why a photo is refused.

One rule for both ways a traveller is enrolled: the overnight re-index
(matcher.reindex.embedding) and the Enroll / EnrollStream RPCs (matcher.service). A
booking photo gives its largest face, unless it has no face (``no_face``), a second face
at least ``SECOND_FACE_AREA_RATIO`` the size of the largest (``multiple_faces``: whose
booking it is cannot be told; smaller faces are bystanders and are ignored), or the face
fails the quality gate (``low_quality:<reasons>``, e.g. ``low_quality:blurred+head_turned``).
The codes are stable: they are written to the re-index's rejects file and named in
Enroll's INVALID_ARGUMENT message.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the codes alone must not load the models' stack (reindex.manifest uses them)
    from .pipeline import Face

# Stable reason codes; a detail may follow after ':' (low_quality:<reasons joined by '+'>).
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
LOW_QUALITY = "low_quality"

# A second face at least this fraction of the largest face's area makes a photo ambiguous.
SECOND_FACE_AREA_RATIO = 0.1


def face_verdict(faces: list[Face], second_face_area_ratio: float = SECOND_FACE_AREA_RATIO,
                 *, accept_low_quality: bool = False) -> tuple[Face | None, str]:
    """(the one enrolable face of a booking photo, "") or (None, the reject reason).

    ``accept_low_quality`` lets a face that fails the quality gate through (Enroll's
    operator override); it never lets through a photo without a face or with several.
    """
    if not faces:
        return None, NO_FACE
    main = max(faces, key=lambda f: f.area)  # as pipeline.largest_face
    if any(f is not main and f.area >= second_face_area_ratio * main.area for f in faces):
        return None, MULTIPLE_FACES
    if not main.quality.accepted and not accept_low_quality:
        return None, f"{LOW_QUALITY}:{'+'.join(main.quality.reasons)}"
    return main, ""


def explain(reason: str, second_face_area_ratio: float = SECOND_FACE_AREA_RATIO) -> str:
    """A reject reason as an operator reads it: the code, then what it means and what to do.

    e.g. ``multiple_faces (a second face at least 10% the size of the largest; send a
    photo of the traveller alone)``.
    """
    code, _, detail = reason.partition(":")
    if code == NO_FACE:
        return f"{reason} (no face found; send a photo showing the traveller's face)"
    if code == MULTIPLE_FACES:
        return (f"{reason} (a second face at least {second_face_area_ratio:.0%} the size of "
                f"the largest; send a photo of the traveller alone)")
    if code == LOW_QUALITY:
        return (f"{reason} (the face fails the quality gate: {detail.replace('+', ', ')}; "
                f"retake it or set accept_low_quality)")
    return reason
