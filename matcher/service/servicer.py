"""The grpc.aio servicer of matcher.v1.Matcher: protos <-> domain calls, errors -> status codes.

No maths and no policy here: faces come from the engine's batched pipeline, what a call
comes to from outcome.py (verdicts, enrolment, audit and metrics). Every failure becomes
one gRPC status in ``status_for``; nothing else in the package chooses a status code.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from ..errors import (
    DeadlineExpired,
    DiskFull,
    GalleryError,
    InvalidInput,
    MatcherError,
    NotReady,
    Overloaded,
    StorageUnavailable,
    UnknownTraveller,
)
from ..face.document import is_document
from ..face.frames import FrameOutcome
from ..face.pipeline import Face
from ..templates import MAX_TEMPLATES_PER_TRAVELLER, check_traveller_id
from ..transport import MAX_PHOTO_BYTES, MAX_REQUEST_PHOTO_BYTES
from ..v1 import matcher_pb2 as pb
from ..v1 import matcher_pb2_grpc as pb_grpc
from . import outcome
from .analysis import (
    AlignedJob,
    Frame,
    ImageJob,
    aligned_from_raw,
    frame_error,
    template_from_values,
)
from .engine import MatchEngine
from .outcome import MatchCall, MatchOutcome, Verdict, request_log
from .serving import ServingState

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
MAX_TOP_K = 50
MAX_CLIENT_ID_CHARS = 128        # request_id, lane_id: stored in the audit log and logged
MAX_DETAILS_CHARS = 400          # status details never echo a long client string
LANE_STREAM_IN_FLIGHT = 16   # requests one lane stream may have in the pipeline at once
ENROLL_STREAM_IN_FLIGHT = 8


class ModelMismatch(GalleryError):
    """A template made by another model than the server's."""


def client_id(value: str, name: str) -> str:
    """A request_id or lane_id as sent: at most 128 printable characters (it goes into
    logs and the audit log, so a newline could forge a log line)."""
    if len(value) > MAX_CLIENT_ID_CHARS or not value.isprintable():
        raise InvalidInput(f"{name} must be at most {MAX_CLIENT_ID_CHARS} printable characters")
    return value


def loggable(value: str) -> str:
    """``value`` if it is a well-formed id, else a bounded escaped form of it."""
    if len(value) <= MAX_CLIENT_ID_CHARS and value.isprintable():
        return value
    return repr(value[:MAX_CLIENT_ID_CHARS]) + ("..." if len(value) > MAX_CLIENT_ID_CHARS else "")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from an error to the gRPC status a caller sees."""
    code = grpc.StatusCode.INTERNAL
    message = "internal error; the request id is in the server log"
    if isinstance(exc, DeadlineExpired):
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    elif isinstance(exc, Overloaded):
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    elif isinstance(exc, NotReady):
        code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
    elif isinstance(exc, DiskFull):  # nothing written; the operator must free space
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    elif isinstance(exc, StorageUnavailable):  # store locked elsewhere, audit log unwritable
        code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
    elif isinstance(exc, UnknownTraveller):
        code, message = grpc.StatusCode.NOT_FOUND, str(exc)
    elif isinstance(exc, InvalidInput):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    elif isinstance(exc, GalleryError):  # wrong model, write on a replica, bad snapshot
        code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    # Anything else (a broken batch contract, an audit write failure, a bug) is INTERNAL
    # with a generic message: its text could name internals the caller has no use for.
    if len(message) > MAX_DETAILS_CHARS:
        message = message[:MAX_DETAILS_CHARS - 3] + "..."
    return code, message


_REJECT_REASON = {grpc.StatusCode.RESOURCE_EXHAUSTED: "overload",
                  grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
                  grpc.StatusCode.UNAVAILABLE: "not_ready"}


# -- protos -> numpy ------------------------------------------------------------------

def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _top_k(value: int) -> int:
    if value == 0:
        return DEFAULT_TOP_K
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {value}")
    return value


def _photo_bytes(probe: pb.Probe) -> int:
    kind = probe.WhichOneof("kind")
    if kind == "image":
        return len(probe.image)
    if kind == "aligned":
        return len(probe.aligned.data)
    return 0  # a template: 2 KB of floats


def check_request_bytes(probes: list[pb.Probe], document: bytes | None = None) -> None:
    """INVALID_ARGUMENT when the photos of one request together pass
    MAX_REQUEST_PHOTO_BYTES (each photo's own cap is the decoder's)."""
    total = sum(_photo_bytes(p) for p in probes) + len(document or b"")
    if total > MAX_REQUEST_PHOTO_BYTES:
        raise InvalidInput(f"the request carries {total / 2**20:.1f} MiB of photos; one "
                           f"request may carry at most {MAX_REQUEST_PHOTO_BYTES // 2**20} "
                           f"MiB (each photo at most {MAX_PHOTO_BYTES // 2**20} MiB): send "
                           f"fewer or smaller photos")


def frame_input(probe: pb.Probe, model_id: str) -> Frame:
    """A probe as the engine takes it: a job for the model batcher, or a ready template."""
    kind = probe.WhichOneof("kind")
    if kind == "image":
        return ImageJob(probe.image)
    if kind == "aligned":
        data = probe.aligned.data
        if probe.aligned.format == pb.AlignedFace.RAW_RGB:
            return AlignedJob(aligned_from_raw(data))
        return AlignedJob(None, data)
    if kind == "template":
        if probe.template.model_id and probe.template.model_id != model_id:
            raise ModelMismatch(f"the template was made by another model "
                                f"({loggable(probe.template.model_id[:64])}); this server "
                                f"runs {model_id} and cannot compare them")
        return template_from_values(probe.template.values)
    raise InvalidInput("the request has no probe: set image, aligned or template")


# -- domain -> protos ------------------------------------------------------------------

def face_info(face: Face) -> pb.FaceInfo:
    q = face.quality
    return pb.FaceInfo(x1=float(face.bbox[0]), y1=float(face.bbox[1]), x2=float(face.bbox[2]),
                       y2=float(face.bbox[3]), det_score=face.det_score,
                       landmarks=[float(v) for v in face.kps.reshape(-1)],
                       inter_eye_px=q.inter_eye_px, sharpness=q.sharpness, yaw_deg=q.yaw_deg,
                       pitch_deg=q.pitch_deg, roll_deg=q.roll_deg,
                       quality_reasons=list(q.reasons))


def _fill_verdict(msg: pb.MatchResponse | pb.FaceMatch, verdict: Verdict) -> None:
    """The fields a MatchResponse and a FaceMatch share, from one verdict."""
    msg.decision = pb.Decision.Value(verdict.outcome)
    msg.reason = verdict.reason
    msg.traveller_id = verdict.traveller_id
    if verdict.score is not None:
        msg.score = verdict.score
    msg.candidates.extend(pb.Candidate(traveller_id=c.traveller_id, score=c.score)
                          for c in verdict.candidates)
    msg.beyond_calibration = verdict.beyond_calibration


def _frame_outcome(index: int, frame: FrameOutcome) -> pb.FrameOutcome:
    out = pb.FrameOutcome(index=index, status=frame.status,
                          quality_reasons=list(frame.quality_reasons),
                          faces_found=frame.faces_found)
    if frame.face is not None:
        out.face.CopyFrom(face_info(frame.face))
    return out


def _face_match(face: Face, verdict: Verdict) -> pb.FaceMatch:
    fm = pb.FaceMatch(face=face_info(face))
    _fill_verdict(fm, verdict)
    return fm


def match_response(answer: MatchOutcome) -> pb.MatchResponse:
    call, probe, verdict = answer.call, answer.probe, answer.verdict
    resp = pb.MatchResponse(request_id=call.request_id, model_id=answer.model_id,
                            gallery_version=answer.gallery_version,
                            faces_found=probe.faces_found, frames_used=probe.frames_used)
    if call.as_frames:
        resp.frames.extend(_frame_outcome(i, f) for i, f in enumerate(probe.frames))
    if probe.face is not None:
        resp.face.CopyFrom(face_info(probe.face))
    _fill_verdict(resp, verdict)
    resp.quality_reasons.extend(verdict.quality_reasons)
    if verdict.threshold is not None:
        resp.threshold = verdict.threshold
    if verdict.decision is not None:
        resp.claimed_traveller_id = verdict.decision.claimed_traveller_id or ""
        resp.fallback_used = verdict.decision.fallback_used
    resp.faces.extend(_face_match(face, v) for face, v in answer.faces)
    resp.timings_ms.update(answer.timings_ms)
    if answer.document is not None:
        resp.document.CopyFrom(_document_check(answer.document))
    resp.checks_passed.extend(answer.checks_passed)
    return resp


def _document_check(document: outcome.DocumentOutcome) -> pb.DocumentCheck:
    check = pb.DocumentCheck(sha256=document.sha256, face=face_info(document.face))
    verdict = document.verdict
    if verdict is not None:
        check.decision = pb.Decision.Value(verdict.outcome)
        check.reason = verdict.reason
        if verdict.score is not None:
            check.score = verdict.score
        if verdict.threshold is not None:
            check.threshold = verdict.threshold
    return check


def document_bytes(request: pb.VerifyRequest | pb.ClearRequest) -> bytes | None:
    """The document a Verify or Clear sent (None without one): a DG2 as read from the
    chip, or the portrait image a reader unpacked."""
    if not request.HasField("document"):
        return None
    kind = request.document.WhichOneof("kind")
    if kind == "dg2":
        data = request.document.dg2
        if not is_document(data):
            raise InvalidInput("document_unreadable:not_dg2 (document.dg2 does not start "
                               "with tag 75; send the data group as read, or the portrait "
                               "as document.image)")
        return data
    if kind == "image":
        return request.document.image
    raise InvalidInput("the document is empty: set dg2 or image")


def _epoch(ts) -> float:
    return ts.seconds + ts.nanos * 1e-9


@dataclass
class _Call:
    """What one matching request asks."""

    rpc: str            # Identify, Verify or Clear
    request: pb.IdentifyRequest | pb.VerifyRequest | pb.ClearRequest
    request_id: str
    lane_id: str
    traveller_id: str = ""
    top_k: int = DEFAULT_TOP_K
    all_faces: bool = False

    @property
    def as_frames(self) -> bool:
        """The request sent ``frames`` (answered with per-frame outcomes), not ``probe``."""
        return len(self.request.frames) > 0

    def probes(self) -> list[pb.Probe]:
        """The request's frames, or its one probe; INVALID_ARGUMENT if it mixes both."""
        frames = list(self.request.frames)
        if not frames:
            return [self.request.probe]
        if self.request.HasField("probe"):
            raise InvalidInput("set either probe or frames, not both")
        if self.all_faces and len(frames) > 1:
            raise InvalidInput("all_faces answers for every face of one photo: send that "
                               "photo as probe, not several frames")
        return frames


class MatcherServicer(pb_grpc.MatcherServicer):
    """Thin: parse, hand to the engine, build the response, map errors.

    ``serving``: what the running server serves now (engine, snapshot, publisher); the
    servicer only reads it.
    """

    def __init__(self, serving: ServingState) -> None:
        self.serving = serving

    def _engine(self) -> MatchEngine:
        engine = self.serving.engine
        if engine is None:
            raise NotReady("models and gallery are still loading; retry shortly")
        return engine

    def _failed(self, rpc: str, request_id: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc)
        request_id = loggable(request_id)
        if code is grpc.StatusCode.INTERNAL:
            log.error("rpc=%s request_id=%s failed: %s", rpc, request_id, type(exc).__name__,
                      exc_info=exc)
        else:
            request_log.info("rpc=%s request_id=%s status=%s", rpc, request_id, code.name)
        engine = self.serving.engine
        if engine is not None:
            outcome.account_failure(engine, rpc, _REJECT_REASON.get(code))
        return code, f"{message} (request_id={request_id})"

    async def _unary(self, rpc: str, request_id: str, context: grpc.aio.ServicerContext,
                     body: Callable[[MatchEngine, float | None], Awaitable[object]]):
        try:
            return await body(self._engine(), _deadline(context))
        except Exception as exc:  # noqa: BLE001 - status_for decides
            code, message = self._failed(rpc, request_id, exc)
        # Not context.abort(): the AbortError it raises would carry this frame's traceback,
        # and with it the request (a 20 MB photo), into grpc's keeping.
        context.set_code(code)
        context.set_details(message)
        return None

    # -- matching -----------------------------------------------------------------------

    def _frames(self, engine: MatchEngine, call: _Call) -> list[Frame]:
        probes = call.probes()
        if not call.as_frames:
            return [frame_input(probes[0], engine.model_id)]
        frames = []
        for index, probe in enumerate(probes):
            try:
                frames.append(frame_input(probe, engine.model_id))
            except MatcherError as exc:
                raise frame_error(index, exc) from None
        return frames

    @staticmethod
    def _request_id(given: str) -> str:
        return given or uuid.uuid4().hex

    def _call(self, kind: str, request) -> _Call:
        rid = self._request_id(request.request_id)
        if kind == "identify":
            return _Call("Identify", request, rid, request.lane_id,
                         top_k=request.top_k, all_faces=request.all_faces)
        if kind == "verify":
            return _Call("Verify", request, rid, request.lane_id,
                         traveller_id=request.traveller_id)
        return _Call("Clear", request, rid, request.lane_id,
                     traveller_id=request.claimed_traveller_id, top_k=request.top_k)

    @staticmethod
    def _document(call: _Call) -> bytes | None:
        if isinstance(call.request, pb.IdentifyRequest):
            return None
        return document_bytes(call.request)

    async def _run_call(self, engine: MatchEngine, call: _Call, deadline: float | None
                        ) -> pb.MatchResponse:
        client_id(call.request_id, "request_id")
        client_id(call.lane_id, "lane_id")
        document = self._document(call)
        check_request_bytes(call.probes(), document)
        asked = MatchCall(call.rpc, call.request_id, call.lane_id, call.traveller_id,
                          _top_k(call.top_k), call.all_faces, call.as_frames, document)
        answer = await outcome.match(engine, asked, self._frames(engine, call), deadline)
        return match_response(answer)

    async def Identify(self, request: pb.IdentifyRequest, context) -> pb.MatchResponse:
        call = self._call("identify", request)
        return await self._unary(call.rpc, call.request_id, context,
                                 lambda engine, dl: self._run_call(engine, call, dl))

    async def Verify(self, request: pb.VerifyRequest, context) -> pb.MatchResponse:
        call = self._call("verify", request)
        return await self._unary(call.rpc, call.request_id, context,
                                 lambda engine, dl: self._run_call(engine, call, dl))

    async def Clear(self, request: pb.ClearRequest, context) -> pb.MatchResponse:
        call = self._call("clear", request)
        return await self._unary(call.rpc, call.request_id, context,
                                 lambda engine, dl: self._run_call(engine, call, dl))

    async def LaneStream(self, request_iterator: AsyncIterator[pb.LaneRequest], context
                         ) -> AsyncIterator[pb.LaneResponse]:
        """Answer each request as soon as it is done; at most LANE_STREAM_IN_FLIGHT at once."""
        out: asyncio.Queue[pb.LaneResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(LANE_STREAM_IN_FLIGHT)

        async def answer(request: pb.LaneRequest) -> None:
            try:
                # None: bytes that are not a LaneRequest (see server._tolerant_handlers).
                kind = request.WhichOneof("call") if request is not None else None
                call = self._call(kind, getattr(request, kind)) if kind else None
                rid = call.request_id if call else self._request_id("")
                try:
                    if call is None:
                        raise InvalidInput("a LaneRequest must be a valid message that sets "
                                           "identify, verify or clear")
                    result = await self._run_call(self._engine(), call, _deadline(context))
                    await out.put(pb.LaneResponse(request_id=rid, result=result))
                except Exception as exc:  # noqa: BLE001 - one bad request, stream goes on
                    code, message = self._failed(call.rpc if call else "LaneStream", rid, exc)
                    await out.put(pb.LaneResponse(
                        request_id=rid, error=pb.Error(code=code.value[0], message=message)))
            finally:
                slots.release()

        in_flight: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
            finally:
                await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await out.get()) is not None:
                yield response
            await reader  # surfaces a broken request stream
        finally:
            # The lane cancelled or went away: what is still being answered is answered
            # to nobody. Cancelled, a request leaves the model queue at once and is
            # neither decided, audited nor counted (the reader, waiting for a free slot,
            # would not cancel the requests it started).
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    # -- gallery --------------------------------------------------------------------------

    async def _enroll(self, engine: MatchEngine, request: pb.EnrollRequest | None,
                      request_id: str, deadline: float | None) -> pb.EnrollResponse:
        if request is None:  # bytes that are not an EnrollRequest, on a stream
            raise InvalidInput("the item is not a valid EnrollRequest message")
        client_id(request.request_id, "request_id")
        traveller_id = check_traveller_id(request.traveller_id)
        if not request.photos or len(request.photos) > MAX_TEMPLATES_PER_TRAVELLER:
            raise InvalidInput(f"send 1 to {MAX_TEMPLATES_PER_TRAVELLER} photos, "
                               f"got {len(request.photos)}")
        check_request_bytes(list(request.photos))
        photos = [frame_input(photo, engine.model_id) for photo in request.photos]
        done = await outcome.enrol(
            engine, request_id, traveller_id, photos,
            accept_low_quality=request.accept_low_quality,
            valid_from=_epoch(request.valid_from) if request.HasField("valid_from") else None,
            valid_to=_epoch(request.valid_to) if request.HasField("valid_to") else None,
            deadline=deadline)
        return pb.EnrollResponse(
            request_id=request_id, traveller_id=traveller_id,
            gallery_version=done.result.gallery_version,
            added_templates=done.result.added_templates, changed=done.result.changed,
            photos=[pb.PhotoOutcome(index=n, enrolled=not reason, reason=reason)
                    for n, reason in enumerate(done.photo_reasons)])

    async def Enroll(self, request: pb.EnrollRequest, context) -> pb.EnrollResponse:
        rid = self._request_id(request.request_id)
        return await self._unary("Enroll", rid, context,
                                 lambda engine, dl: self._enroll(engine, request, rid, dl))

    async def EnrollStream(self, request_iterator: AsyncIterator[pb.EnrollRequest], context
                           ) -> AsyncIterator[pb.EnrollResponse]:
        """Up to ENROLL_STREAM_IN_FLIGHT enrolments run at once; answers keep request order."""
        window: collections.deque[tuple[str, asyncio.Task]] = collections.deque()

        async def one(request: pb.EnrollRequest, rid: str) -> pb.EnrollResponse:
            try:
                return await self._enroll(self._engine(), request, rid, _deadline(context))
            except Exception as exc:  # noqa: BLE001 - one bad item, bulk goes on
                code, message = self._failed("EnrollStream", rid, exc)
                return pb.EnrollResponse(
                    request_id=loggable(rid),
                    traveller_id=request.traveller_id if request is not None else "",
                    error=pb.Error(code=code.value[0], message=message))

        try:
            async for request in request_iterator:
                rid = self._request_id(request.request_id if request is not None else "")
                window.append((rid, asyncio.create_task(one(request, rid))))
                if len(window) >= ENROLL_STREAM_IN_FLIGHT:
                    yield await window.popleft()[1]
            while window:
                yield await window.popleft()[1]
        finally:
            for _, task in window:
                task.cancel()

    async def Remove(self, request: pb.RemoveRequest, context) -> pb.RemoveResponse:
        rid = self._request_id(request.request_id)

        async def body(engine: MatchEngine, deadline: float | None) -> pb.RemoveResponse:
            client_id(request.request_id, "request_id")
            traveller_id = check_traveller_id(request.traveller_id)
            version = await outcome.remove(engine, rid, traveller_id, deadline)
            return pb.RemoveResponse(gallery_version=version)

        return await self._unary("Remove", rid, context, body)

    async def GetTraveller(self, request: pb.GetTravellerRequest, context) -> pb.TravellerInfo:
        async def body(engine: MatchEngine, deadline: float | None) -> pb.TravellerInfo:
            t = await engine.get_traveller(check_traveller_id(request.traveller_id))
            info = pb.TravellerInfo(traveller_id=t.traveller_id, templates=t.template_count,
                                    photo_sha256=list(t.photo_sha256s), model_id=t.model_id)
            info.valid_from.FromNanoseconds(int(t.valid_from * 1e9))
            info.valid_to.FromNanoseconds(int(t.valid_to * 1e9))
            return info

        return await self._unary("GetTraveller", self._request_id(""), context, body)

    async def GetGalleryInfo(self, request, context) -> pb.GalleryInfo:
        async def body(engine: MatchEngine, deadline: float | None) -> pb.GalleryInfo:
            g, decider = engine.gallery, engine.decider
            searchable = await engine.searchable_travellers()
            many = decider.point_1toN(gallery_size=searchable)  # the N a search uses now
            return pb.GalleryInfo(
                gallery_version=g.version, travellers=g.size, templates=g.template_count,
                searchable_travellers=searchable, index_entries=g.index_entries,
                model_id=engine.model_id, index_kind=g.index_kind, role=self.serving.role,
                snapshot=self.serving.snapshot_name,
                threshold_1to1=decider.point_1to1.threshold, threshold_1ton=many.threshold,
                fmr_1to1=decider.policy.fmr_1to1, fpir_1ton=decider.policy.fpir_1toN,
                max_supported_gallery_size=many.max_gallery_size,
                one_to_many_supported=many.supported,
                score_model=decider.score_model.settings_hash)

        return await self._unary("GetGalleryInfo", self._request_id(""), context, body)

    async def PublishSnapshot(self, request, context) -> pb.PublishSnapshotResponse:
        async def body(engine: MatchEngine, deadline: float | None):
            publish = self.serving.publish
            if publish is None:
                raise GalleryError("this server cannot publish snapshots (it is a replica)")
            name, version = await publish()
            return pb.PublishSnapshotResponse(snapshot=name, gallery_version=version)

        return await self._unary("PublishSnapshot", self._request_id(""), context, body)
