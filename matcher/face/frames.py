"""Frames of one traveller -> one probe: each frame's faces, the frames without a usable
face skipped, the usable ones' templates fused into one (``fuse_templates``), and the rule
that they must look like one person before that probe is matched.

A lane may send up to ``MAX_FRAMES`` frames of one traveller (say consecutive camera
frames); a single probe is one frame. Matching policy, like the enrolment rule beside it
(enrolment.py): the "same person" score is given by the caller, from the score model
(``Decider.same_person``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInput
from ..templates import fuse_templates
from .pipeline import Face

MAX_FRAMES = 8     # frames of one traveller in one matching request

# What became of one frame of a probe (MatchResponse.frames[].status), and why a fused
# probe was not matched.
FRAME_USED, FRAME_NO_FACE, FRAME_LOW_QUALITY = "used", "no_face", "low_quality"
FRAMES_DISAGREE = "frames_disagree"


def check_frame_count(count: int) -> None:
    """The one check of how many frames a probe may have: 1 to MAX_FRAMES."""
    if not 1 <= count <= MAX_FRAMES:
        raise InvalidInput(f"send one probe or at most {MAX_FRAMES} frames of one "
                           f"traveller, got {count} frames")


@dataclass
@dataclass
class Analysis:
    """Faces of one probe, largest first; for a template or aligned probe, one pseudo face
    with only a template. timings_ms per stage (the batch's time for shared stages)."""

    faces: list[Face]
    templates: np.ndarray              # (n, 512) float32, rows match ``faces`` (or 1 row)
    from_image: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)    # the photo's full-size (height, width); images only


@dataclass(frozen=True)
class FrameOutcome:
    """What one frame gave: ``status`` FRAME_USED (its template is in the fused probe),
    FRAME_NO_FACE or FRAME_LOW_QUALITY; ``face`` its largest face (None for templates,
    aligned faces and no face); ``faces_found`` how many faces it had."""

    status: str
    face: Face | None
    faces_found: int

    @property
    def quality_reasons(self) -> tuple[str, ...]:
        return self.face.quality.reasons if self.face is not None else ()


@dataclass
class FusedProbe:
    """One traveller's probe made from 1..MAX_FRAMES frames.

    template: (512,) float32, L2-normalised: the usable frames' templates fused; None when
    no frame was usable (``status`` then says FRAME_NO_FACE or FRAME_LOW_QUALITY).
    best: the frame the answer reports (face box, quality reasons): the used frame with
    the largest face, else the frame whose largest face has the fewest quality reasons
    (ties: the larger face); None when no frame had a face. agree: False when the used
    frames are not alike enough to be one person (FRAMES_DISAGREE: nothing is matched).
    analyses: each frame's Analysis, in order. same_person: the score every two used
    frames had to reach (None: not checked, as for one frame).
    """

    template: np.ndarray | None
    frames: list[FrameOutcome]
    best: int | None
    analyses: list[Analysis]
    timings_ms: dict[str, float] = field(default_factory=dict)
    agree: bool = True
    same_person: float | None = None

    @property
    def frames_used(self) -> int:
        return sum(f.status == FRAME_USED for f in self.frames)

    @property
    def status(self) -> str:
        """FRAME_USED (a template to match), FRAME_LOW_QUALITY or FRAME_NO_FACE."""
        if self.template is not None:
            return FRAME_USED
        return FRAME_NO_FACE if self.best is None else FRAME_LOW_QUALITY

    @property
    def face(self) -> Face | None:
        return None if self.best is None else self.frames[self.best].face

    @property
    def faces_found(self) -> int:
        return 0 if self.best is None else self.frames[self.best].faces_found


def frame_outcome(analysis: Analysis) -> FrameOutcome:
    """One frame's verdict: an image's largest face decides, as for a single probe."""
    if not analysis.from_image:
        return FrameOutcome(FRAME_USED, None, 0)
    if not analysis.faces:
        return FrameOutcome(FRAME_NO_FACE, None, 0)
    face = analysis.faces[0]  # largest first
    status = FRAME_LOW_QUALITY if face.quality.reasons else FRAME_USED
    return FrameOutcome(status, face, len(analysis.faces))


def _best_frame(frames: list[FrameOutcome]) -> int | None:
    def area(f: FrameOutcome) -> float:
        return f.face.area if f.face is not None else -1.0

    used = [i for i, f in enumerate(frames) if f.status == FRAME_USED]
    if used:
        return max(used, key=lambda i: area(frames[i]))
    faced = [i for i, f in enumerate(frames) if f.face is not None]
    if not faced:
        return None
    return min(faced, key=lambda i: (len(frames[i].quality_reasons), -area(frames[i])))


def fuse_frames(analyses: list[Analysis], timings_ms: dict[str, float] | None = None,
                same_person: float | None = None) -> FusedProbe:
    """Frames of one traveller -> one probe: unusable frames skipped, the rest fused.

    ``same_person``: the score every two used frames must reach (see frames_agree); None
    skips the check.
    """
    frames = [frame_outcome(a) for a in analyses]
    used = [a.templates[0] for a, f in zip(analyses, frames, strict=True) if f.status == FRAME_USED]
    template = fuse_templates(np.stack(used)) if used else None
    agree = not used or same_person is None or frames_agree(np.stack(used), same_person)
    return FusedProbe(template, frames, _best_frame(frames), analyses,
                      dict(timings_ms or {}), agree, same_person)


def frames_agree(templates: np.ndarray, threshold: float) -> bool:
    """True if every two of the (k, 512) unit templates score at least ``threshold``.

    Fusing frames of two people gives a template that lies between them and can match
    either (two unrelated faces fuse to about 0.7 cosine with each): a tailgater's frame
    must not lend its face to the traveller's. The 1:1 threshold is what "the same person"
    means everywhere else.
    """
    if len(templates) < 2:
        return True
    scores = templates @ templates.T
    return bool(scores.min() >= threshold)
