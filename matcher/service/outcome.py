"""What a call comes to, in domain terms: a matching call's verdict (NO_FACE, LOW_QUALITY,
frames that disagree, or the gallery's decision), the enrolment policy, and the account of
each (metrics, the audit record, one log line). servicer.py turns protos into these calls
and their results back into protos.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInput, UnknownTraveller
from ..face.enrolment import (
    PHOTOS_DISAGREE,
    BookingPhoto,
    EnrolmentRule,
    GivenFace,
    choose_faces,
    explain,
)
from ..face.frames import FRAMES_DISAGREE, FusedProbe
from ..face.pipeline import Face
from ..gallery.decision import Decision, Outcome, Reason
from ..gallery.store import EnrolResult
from ..templates import EMBEDDING_DIM, Candidate, check_traveller_id, photo_sha256
from .analysis import Frame, ImageJob, photo_bytes
from .engine import MatchEngine

# One line per answered request: ids, decision, scores and timings, never a face.
request_log = logging.getLogger("matcher.requests")
# Refusals that may be an attempt to book under someone else's face.
security_log = logging.getLogger("matcher.security")

DEFAULT_WINDOW_S = 24 * 3600.0   # an enrolment without valid_to is bookable for a day
MATCHING_RPCS = ("Identify", "Verify", "Clear")

# The answers no gallery decision makes, named as matcher.v1.Decision names them (audit
# records, metrics); MATCH and NO_MATCH are the gallery's Outcome values.
NO_FACE, LOW_QUALITY = "NO_FACE", "LOW_QUALITY"


def as_answered(value: float) -> float:
    """``value`` as the answer carries it (a proto float, float32), so that the audit
    record and the log say what the caller was told."""
    return float(np.float32(value))


@dataclass(frozen=True)
class Verdict:
    """What the service answers about one probe or one face of a photo.

    ``outcome`` MATCH, NO_MATCH, NO_FACE or LOW_QUALITY; ``decision`` the gallery's when
    one was made; ``threshold`` what the score was compared with (MATCH and NO_MATCH only).
    """

    outcome: str
    reason: str
    decision: Decision | None = None
    threshold: float | None = None
    quality_reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        return cls(decision.outcome.value, decision.reason.value, decision, decision.threshold)

    @property
    def traveller_id(self) -> str:
        """The matched traveller, "" for any other outcome."""
        return (self.decision.traveller_id or "") if self.decision is not None else ""

    @property
    def score(self) -> float | None:
        """The deciding score, None when there is none (or it is not finite)."""
        score = self.decision.score if self.decision is not None else None
        return score if score is not None and math.isfinite(score) else None

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return self.decision.candidates if self.decision is not None else ()

    @property
    def beyond_calibration(self) -> bool:
        """A 1:N decision whose threshold rests on an FMR below what calibration supports."""
        d = self.decision
        return d is not None and d.mode == "identify" and not d.supported


NO_FACE_VERDICT = Verdict(NO_FACE, "no_face")
# Clear with a document whose portrait the capture does not match: no booking is looked at.
DOCUMENT_MISMATCH = "document_mismatch"
# MatchResponse.checks_passed
CHECK_DOCUMENT, CHECK_CLAIM, CHECK_SEARCH = "document", "claim", "search"


@dataclass(frozen=True)
class MatchCall:
    """What one matching request asks: ``rpc`` Identify, Verify or Clear; ``traveller_id``
    Verify's traveller or Clear's claim ("" for none); ``as_frames`` the probe came as
    frames (answered frame by frame); ``all_faces`` every face of one photo (Identify).

    A traveller id to check is checked here, before any work and whatever the photo holds:
    it goes into the audit record even when no decision is made (no face, low quality).
    """

    rpc: str
    request_id: str
    lane_id: str
    traveller_id: str = ""
    top_k: int = 5
    all_faces: bool = False
    as_frames: bool = False
    # Verify / Clear: the travel document's portrait bytes (a DG2 or an image), checked
    # for this call only; never stored or logged.
    document: bytes | None = None

    def __post_init__(self) -> None:
        if self.document is not None:
            if self.rpc not in ("Verify", "Clear"):
                raise InvalidInput("a document is checked by Verify and Clear only")
            if self.rpc == "Verify" and self.traveller_id:
                raise InvalidInput("Verify checks a capture against a booking (traveller_id) "
                                   "or a document, not both: use Clear to check both")
        if (self.rpc == "Verify" and self.document is None) \
                or (self.rpc == "Clear" and self.traveller_id):
            check_traveller_id(self.traveller_id)


@dataclass(frozen=True)
class DocumentOutcome:
    """The capture against a document's portrait: ``verdict`` None when the capture had no
    usable face to compare; ``face`` the portrait's face; ``sha256`` of the bytes sent."""

    sha256: str
    face: Face
    verdict: Verdict | None


@dataclass
class MatchOutcome:
    """A matching call answered: its verdict, the probe it was about, and for
    ``all_faces`` a verdict for every face of the photo (largest first)."""

    call: MatchCall
    verdict: Verdict
    probe: FusedProbe
    model_id: str
    gallery_version: int
    faces: list[tuple[Face, Verdict]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    document: DocumentOutcome | None = None

    @property
    def checks_passed(self) -> tuple[str, ...]:
        """What held, in order: the document, then the claim or the search."""
        checks = []
        if self.document is not None and self.document.verdict is not None \
                and self.document.verdict.outcome == Outcome.MATCH.value:
            checks.append(CHECK_DOCUMENT)
        decision = self.verdict.decision
        if decision is not None and decision.is_match and decision.mode != "document":
            checks.append(CHECK_SEARCH if decision.fallback_used or decision.mode == "identify"
                          else CHECK_CLAIM)
        return tuple(checks)


async def match(engine: MatchEngine, call: MatchCall, frames: Sequence[Frame],
                deadline: float | None) -> MatchOutcome:
    """Analyse and fuse the frames (and the document's portrait, in the same batch when
    the batcher allows), decide, account for it (the audit record is durable before this
    returns)."""
    started = time.perf_counter()
    if call.document is None:
        probe = await engine.analyse_frames(frames, deadline)
        portrait = None
    else:
        probe, portrait = await asyncio.gather(engine.analyse_frames(frames, deadline),
                                               _portrait(engine, call.document, deadline))
    t = time.perf_counter()
    face = probe.face
    checked: Verdict | None = None   # the capture against the document, when compared
    if probe.template is None:  # no usable frame: FRAME_NO_FACE or FRAME_LOW_QUALITY
        verdict = (NO_FACE_VERDICT if face is None else
                   Verdict(LOW_QUALITY, "low_quality", quality_reasons=face.quality.reasons))
    elif not probe.agree:
        verdict = Verdict(Outcome.NO_MATCH.value, FRAMES_DISAGREE, threshold=probe.same_person)
    elif portrait is None:
        verdict = Verdict.of(await _decide(engine, call, probe.template, deadline))
    else:
        checked = _against_document(engine, probe.template, portrait)
        if call.rpc == "Verify":
            verdict = checked
        elif checked.outcome != Outcome.MATCH.value:
            verdict = Verdict(checked.outcome, DOCUMENT_MISMATCH, checked.decision,
                              checked.threshold)
        else:
            verdict = Verdict.of(await _decide(engine, call, probe.template, deadline))
    document = (None if portrait is None else
                DocumentOutcome(photo_sha256(call.document or b""), portrait, checked))
    faces = []
    if call.all_faces and not call.as_frames:
        faces = await _all_faces(engine, probe, call.top_k, deadline)
    search_ms = (time.perf_counter() - t) * 1e3
    # The version the deciding search or booking read saw; an answer that read no
    # gallery (no face, a document alone) names the one served as it is answered.
    decided = verdict.decision
    gallery_version = (decided.gallery_version
                       if decided is not None and decided.gallery_version is not None
                       else engine.gallery.version)
    timings = {k: float(v) for k, v in probe.timings_ms.items()}
    timings["search"] = search_ms
    timings["total"] = (time.perf_counter() - started) * 1e3
    outcome = MatchOutcome(call, verdict, probe, engine.model_id, gallery_version, faces,
                           timings, document)
    await _account(engine, outcome)
    return outcome


async def _portrait(engine: MatchEngine, document: bytes, deadline: float | None) -> Face:
    """The face of a document's portrait: its largest, which must pass the quality gate
    (a chip portrait is made to ICAO's rules; one that fails is not a reference to trust).
    INVALID_ARGUMENT (document_unusable:...) otherwise; unreadable documents are refused
    by the decoder (document_unreadable:...)."""
    analysis = await engine.analyse_one(ImageJob(document), deadline)
    if not analysis.faces:
        raise InvalidInput("document_unusable:no_face (no face was found in the document's "
                           "portrait; check the traveller against the printed page)")
    face = analysis.faces[0]  # largest first
    if face.quality.reasons:
        raise InvalidInput(f"document_unusable:low_quality:{','.join(face.quality.reasons)} "
                           "(the document's portrait fails the quality gate; check the "
                           "traveller against the printed page)")
    return face


def _against_document(engine: MatchEngine, template: np.ndarray, portrait: Face) -> Verdict:
    """The capture (512,) against the portrait, 1:1 at the single-photo threshold: one
    capture against one photo, the comparison kind of a one-photo booking."""
    threshold = engine.decider.same_person
    score = float(template @ portrait.template)
    matched = score >= threshold
    decision = Decision(Outcome.MATCH if matched else Outcome.NO_MATCH,
                        Reason.ABOVE_THRESHOLD if matched else Reason.BELOW_THRESHOLD,
                        "document", None, score, threshold)
    return Verdict.of(decision)


async def _decide(engine: MatchEngine, call: MatchCall, template: np.ndarray,
                  deadline: float | None) -> Decision:
    if call.rpc == "Identify":
        return (await engine.identify(template[None, :], call.top_k, deadline))[0]
    if call.rpc == "Verify":  # UnknownTraveller (NOT_FOUND) from the gallery
        return await engine.verify(template, call.traveller_id)
    return await engine.clear(template, call.traveller_id, call.top_k)


async def _all_faces(engine: MatchEngine, probe: FusedProbe, k: int, deadline: float | None
                     ) -> list[tuple[Face, Verdict]]:
    """Every face of one photo searched (1:N), a low-quality one answered LOW_QUALITY."""
    analysis = probe.analyses[0]  # one photo: all_faces is refused with several frames
    if not analysis.from_image or not analysis.faces:
        return []
    usable = [i for i, f in enumerate(analysis.faces) if not f.quality.reasons]
    decisions = (await engine.identify(analysis.templates[usable], k, deadline)
                 if usable else [])
    by_face = dict(zip(usable, decisions, strict=True))
    low = Verdict(LOW_QUALITY, "low_quality")
    return [(f, Verdict.of(by_face[i]) if i in by_face else low)
            for i, f in enumerate(analysis.faces)]


async def _account(engine: MatchEngine, outcome: MatchOutcome) -> None:
    """Metrics, the audit record (durable before the answer leaves), one log line."""
    call, verdict, probe = outcome.call, outcome.verdict, outcome.probe
    engine.metrics.count_decision(call.rpc, verdict.outcome, call.lane_id)
    engine.metrics.observe_stage("search", outcome.timings_ms["search"] / 1e3)
    engine.metrics.observe_stage("total", outcome.timings_ms["total"] / 1e3)
    score = None if verdict.score is None else as_answered(verdict.score)
    decision = verdict.decision
    document = _document_fields(outcome.document)
    await engine.record(
        "decision", rpc=call.rpc, request_id=call.request_id, lane_id=call.lane_id,
        decision=verdict.outcome, reason=verdict.reason,
        traveller_id=verdict.traveller_id or None,
        claimed_traveller_id=call.traveller_id or None, score=score,
        threshold=None if verdict.threshold is None else as_answered(verdict.threshold),
        gallery_version=outcome.gallery_version, model_id=outcome.model_id,
        faces_found=probe.faces_found,
        fallback_used=decision is not None and decision.fallback_used,
        beyond_calibration=verdict.beyond_calibration, frames_used=probe.frames_used,
        **document)
    request_log.info("rpc=%s request_id=%s lane_id=%s decision=%s reason=%s score=%s "
                     "faces=%d frames_used=%d%s batch_queue_ms=%.1f total_ms=%.1f",
                     call.rpc, call.request_id, call.lane_id or "-", verdict.outcome,
                     verdict.reason, "-" if score is None else f"{score:.3f}",
                     probe.faces_found, probe.frames_used,
                     f" document={document['document_decision']}" if document else "",
                     as_answered(outcome.timings_ms.get("queue", 0.0)),
                     as_answered(outcome.timings_ms["total"]))


def _document_fields(document: DocumentOutcome | None) -> dict[str, object]:
    """The audit fields of a document check: its sha256, decision and score (never the
    portrait, its template or its bytes)."""
    if document is None:
        return {}
    verdict = document.verdict
    return {"document_sha256": document.sha256,
            "document_decision": verdict.outcome if verdict is not None else "NOT_CHECKED",
            "document_score": (None if verdict is None or verdict.score is None
                               else as_answered(verdict.score))}


def account_failure(engine: MatchEngine, rpc: str, rejected: str | None) -> None:
    """Count a call that ended in an error; ``rejected`` says why it was turned away
    (overload, deadline, not_ready), None for any other error."""
    if rejected is not None:
        engine.metrics.count_rejected(rejected)
    if rpc in MATCHING_RPCS:
        engine.metrics.count_decision(rpc, "ERROR")


@dataclass(frozen=True)
class EnrolOutcome:
    """What Enroll did: the store's result and, per photo in order, "" (enrolled) or the
    reason it was refused."""

    result: EnrolResult
    photo_reasons: list[str]


async def enrol(engine: MatchEngine, request_id: str, traveller_id: str,
                photos: Sequence[Frame], *, accept_low_quality: bool,
                valid_from: float | None, valid_to: float | None,
                deadline: float | None) -> EnrolOutcome:
    """Enrol a traveller's usable booking photos, answered once durable and audited.

    The photos are judged together by the overnight re-index's rule and codes
    (matcher.face.enrolment), against the traveller's stored templates if it is booked
    already. InvalidInput when no photo is usable, or when the photos show different
    people (audited as a refused enrolment, nothing stored). ``valid_from`` None: now;
    ``valid_to`` None: DEFAULT_WINDOW_S after ``valid_from``.
    """
    analyses = await asyncio.gather(*(engine.analyse_one(p, deadline) for p in photos))
    try:
        stored = (await engine.get_traveller(traveller_id)).templates
    except UnknownTraveller:
        stored = np.empty((0, EMBEDDING_DIM), np.float32)
    booking = [BookingPhoto([GivenFace(t) for t in stored[i:i + 1]], (0, 0), enrolled=True)
               for i in range(len(stored))]
    for analysis in analyses:
        booking.append(BookingPhoto(analysis.faces, analysis.shape) if analysis.from_image
                       else BookingPhoto([GivenFace(analysis.templates[0])], (0, 0)))
    rule = EnrolmentRule(engine.consistency_threshold, accept_low_quality=accept_low_quality)
    # off the event loop: 16 group photos of 64 faces each take most of a second
    verdicts = (await asyncio.to_thread(choose_faces, booking, rule))[len(stored):]
    reasons = [v.reason for v in verdicts]
    if PHOTOS_DISAGREE in reasons or all(reasons):
        await _refuse_enrolment(engine, request_id, traveller_id, reasons)
    kept = [n for n, v in enumerate(verdicts) if v.face is not None]
    templates = np.stack([verdicts[n].face.template for n in kept])  # type: ignore[union-attr]
    shas = [photo_sha256(photo_bytes(photos[n])) for n in kept]
    valid_from = time.time() if valid_from is None else valid_from
    valid_to = valid_from + DEFAULT_WINDOW_S if valid_to is None else valid_to
    result = await engine.enroll(traveller_id, templates, valid_from, valid_to, shas, deadline)
    await engine.record("enrol", request_id=request_id, traveller_id=traveller_id,
                        gallery_version=result.gallery_version,
                        added_templates=result.added_templates, changed=result.changed,
                        photos_refused=len(photos) - len(kept))
    request_log.info("rpc=Enroll request_id=%s photos=%d refused=%d added=%d "
                     "gallery_version=%d", request_id, len(photos), len(photos) - len(kept),
                     result.added_templates, result.gallery_version)
    return EnrolOutcome(result, reasons)


async def _refuse_enrolment(engine: MatchEngine, request_id: str, traveller_id: str,
                            reasons: list[str]) -> None:
    """Nothing to enrol: raise InvalidInput naming each photo's reason. Photos of
    different people are a security event: audited and logged, never trimmed to one."""
    disagree = PHOTOS_DISAGREE in reasons
    if disagree:
        await engine.record("enrol_refused", request_id=request_id,
                            traveller_id=traveller_id, reason=PHOTOS_DISAGREE,
                            photos=len(reasons))
        security_log.warning("rpc=Enroll request_id=%s refused=%s photos=%d: the booking's "
                             "photos show different people", request_id, PHOTOS_DISAGREE,
                             len(reasons))
        raise InvalidInput(f"booking refused, nothing enrolled: {explain(PHOTOS_DISAGREE)}")
    detail = "; ".join(f"photo {n} refused: {explain(r)}" for n, r in enumerate(reasons, 1))
    raise InvalidInput(f"no photo could be enrolled: {detail}")


async def remove(engine: MatchEngine, request_id: str, traveller_id: str,
                 deadline: float | None) -> int:
    """Remove a traveller (effective on return) and audit it; the new gallery_version."""
    version = await engine.remove(traveller_id, deadline)
    await engine.record("remove", request_id=request_id, traveller_id=traveller_id,
                        gallery_version=version)
    request_log.info("rpc=Remove request_id=%s gallery_version=%d", request_id, version)
    return version
