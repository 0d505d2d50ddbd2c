"""What the service does with a probe, in numpy terms: batched face analysis, frame
fusion (matcher.face.frames), gallery decisions, enrolment, audit. servicer.py turns
protos into calls on this and back.

Compute layout: model calls go through one MicroBatcher (decode -> detect -> align ->
embed in its worker threads); 1:N searches through a second that puts every waiting search
into one gallery call (one pass over the gallery serves the batch); 1:1 checks and Clear
run in a small thread pool, SQLite writes in their own pool with a deadline, so a stuck
write holds neither a model worker nor a 1:1 check. The event loop only moves bytes.

A probe may come as up to ``MAX_FRAMES`` frames of one traveller: they go to the model
batcher as one job (one batch: one detector run per input size, one embedder run), and
their analyses are fused into one probe (``fuse_frames``) that is matched once, if they
look like one person.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..errors import AuditUnavailable, DeadlineExpired, InvalidInput, MatcherError
from ..face.frames import Analysis, FusedProbe, check_frame_count, fuse_frames
from ..face.pipeline import Pipeline, StageTimings
from ..gallery.decision import Decider, Decision, DecisionPolicy, consistency_threshold
from ..gallery.scoremodel import ScoreModel, check_settings
from ..gallery.served import ServedGallery
from ..gallery.store import EnrolResult, Traveller
from ..templates import ALIGNED_SIZE, EMBEDDING_DIM, check_templates
from .audit import AuditLog
from .batching import BatchConfig, MicroBatcher
from .metrics import Metrics

log = logging.getLogger(__name__)

ALIGNED_RAW_BYTES = ALIGNED_SIZE * ALIGNED_SIZE * 3
AUDIT_FAILURE_POLICIES = ("fail_closed", "fail_open")
SEARCH_BATCH = 64  # probes per 1:N gallery call

# -- jobs for the model batcher ----------------------------------------------------------

@dataclass(frozen=True)
class ImageJob:
    data: bytes


@dataclass(frozen=True)
class AlignedJob:
    """An aligned face: ``crop`` (112, 112, 3) uint8 RGB, or ``data`` an encoded 112x112."""

    crop: np.ndarray | None
    data: bytes = b""


@dataclass(frozen=True)
class FramesJob:
    """The frames of one traveller's probe: analysed together, in one model batch.
    ``positions``: each frame's index in the request (what an error names)."""

    frames: tuple[ImageJob | AlignedJob, ...]
    positions: tuple[int, ...]


Job = ImageJob | AlignedJob | FramesJob
# One frame as the engine takes it: a job for the models, or a ready (512,) template.
Frame = ImageJob | AlignedJob | np.ndarray


def job_weight(job: Job) -> int:
    """Units of model work a job stands for (MicroBatcher weight): its frames."""
    return len(job.frames) if isinstance(job, FramesJob) else 1


@dataclass
class FramesAnalysis:
    """A FramesJob's answer: one Analysis per frame, in order, and the job's stage times
    (decode summed over its frames; detect, align, embed, quality: its batch's)."""

    frames: list[Analysis]
    timings_ms: dict[str, float]


def _frames_timings(frames: list[Analysis], shared: dict[str, dict[str, float]]
                    ) -> dict[str, float]:
    """A FramesJob's stage times: the batch's shared stages once per kind of frame in it,
    plus each image frame's own decode (an image Analysis's decode holds its own decode
    and the batch's shared finer decodes)."""
    timings: dict[str, float] = {}
    for kind in sorted({"image" if a.from_image else "aligned" for a in frames}):
        for stage, ms in shared[kind].items():
            timings[stage] = timings.get(stage, 0.0) + ms
    finer = shared["image"].get("decode", 0.0)
    own = [a.timings_ms.get("decode", 0.0) - finer for a in frames if a.from_image]
    if own:
        timings["decode"] = sum(own) + finer
    return timings


def frame_error(index: int, exc: BaseException) -> BaseException:
    """``exc`` of the same kind, its message naming the frame it came from (frames[i])."""
    if not isinstance(exc, MatcherError):
        return exc
    try:
        return type(exc)(f"frames[{index}]: {exc}")
    except TypeError:  # a subclass with another constructor: keep it as it is
        return exc


def aligned_from_raw(data: bytes) -> np.ndarray:
    if len(data) != ALIGNED_RAW_BYTES:
        raise InvalidInput(f"a raw aligned face is {ALIGNED_SIZE}x{ALIGNED_SIZE}x3 = "
                           f"{ALIGNED_RAW_BYTES} bytes, got {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(ALIGNED_SIZE, ALIGNED_SIZE, 3)


def template_from_values(values: Sequence[float]) -> np.ndarray:
    """A template sent as a probe: (512,) float32, finite and L2-normalised (checked)."""
    template = np.asarray(values, np.float32)
    if template.shape != (EMBEDDING_DIM,):
        raise InvalidInput(f"a template has {EMBEDDING_DIM} values, got {template.size}")
    return check_templates(template, what="the template")[0]


def photo_bytes(frame: Frame) -> bytes:
    """The bytes that name a probe's photo (photo_sha256): an image or an aligned face as
    sent (a raw one's pixels), a template's float32 values."""
    if isinstance(frame, ImageJob):
        return frame.data
    if isinstance(frame, AlignedJob):
        return frame.data if frame.crop is None else frame.crop.tobytes()
    return frame.tobytes()


class MatchEngine:
    """Pipeline + batcher + gallery + decider + audit, for one running server."""

    def __init__(self, pipeline: Pipeline, gallery: ServedGallery,
                 batch: BatchConfig = BatchConfig(), policy: DecisionPolicy | None = None,
                 metrics: Metrics | None = None, audit: AuditLog | None = None,
                 search_threads: int = 2, score_model: ScoreModel | None = None, *,
                 audit_failure: str = "fail_closed") -> None:
        if audit_failure not in AUDIT_FAILURE_POLICIES:
            raise ValueError(f"audit_failure must be one of {AUDIT_FAILURE_POLICIES}, "
                             f"got: {audit_failure!r}")
        self.audit_failure = audit_failure
        self.pipeline = pipeline
        self.gallery = gallery
        self.decider = Decider(gallery, policy, score_model)
        check_settings(self.decider.score_model, pipeline.settings_hash(), pipeline.model_id,
                       gallery.model_id)
        self.consistency_threshold = consistency_threshold(self.decider.score_model,
                                                           self.decider.policy)
        self.metrics = metrics or Metrics()
        self.audit = audit
        self.batcher: MicroBatcher[Job, Analysis | FramesAnalysis] = MicroBatcher(
            self._run_batch, batch, name="models",
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.set_queue_depth,
            on_expired=lambda: self.metrics.count_rejected("deadline"),
            weight=job_weight)
        # Greedy: no waiting, every search queued while the previous batch ran joins the
        # next one. One worker: FAISS parallelises a batch over the cores itself.
        self.search_batcher: MicroBatcher[tuple[np.ndarray, int], list[Decision]] = \
            MicroBatcher(self._search_batch,
                         BatchConfig(max_batch=SEARCH_BATCH, max_wait_s=0.0,
                                     max_queue=max(batch.max_queue, SEARCH_BATCH), workers=1),
                         name="search")
        self._search_pool = ThreadPoolExecutor(search_threads, thread_name_prefix="search")
        self._write_pool = ThreadPoolExecutor(2, thread_name_prefix="store-write")
        self.metrics.set_model_info(pipeline.model_id)

    @property
    def model_id(self) -> str:
        return self.pipeline.model_id

    def start(self) -> None:
        self.batcher.start()
        self.search_batcher.start()
        self.publish_gallery_metrics()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.search_batcher.stop()
        self._search_pool.shutdown(wait=True)
        # A write stuck in the store gives up within the store's bounded wait.
        self._write_pool.shutdown(wait=True)

    def publish_gallery_metrics(self) -> None:
        self.metrics.set_gallery(self.gallery.template_count, self.gallery.version)

    # -- the batch function (runs in a worker thread) ---------------------------------

    def _run_batch(self, jobs: list[Job]) -> list[Analysis | FramesAnalysis | BaseException]:
        """Every frame of every job in one pipeline run; a FramesJob's answers regrouped."""
        units: list[ImageJob | AlignedJob] = []
        for job in jobs:
            units.extend(job.frames if isinstance(job, FramesJob) else (job,))
        analysed, shared = self._analyse_units(units)
        results: list[Analysis | FramesAnalysis | BaseException] = []
        start = 0
        for job in jobs:
            if not isinstance(job, FramesJob):
                results.append(analysed[start])
                start += 1
                continue
            mine = analysed[start:start + len(job.frames)]
            start += len(job.frames)
            failed = next(((i, a) for i, a in enumerate(mine) if isinstance(a, BaseException)),
                          None)
            if failed is not None:  # a bad frame is a bad request, as a bad single probe is
                results.append(frame_error(job.positions[failed[0]], failed[1]))
                continue
            frames = [a for a in mine if isinstance(a, Analysis)]  # all of them: none failed
            results.append(FramesAnalysis(frames, _frames_timings(frames, shared)))
        return results

    def _analyse_units(self, jobs: list[ImageJob | AlignedJob]
                       ) -> tuple[list[Analysis | BaseException], dict[str, dict[str, float]]]:
        """One Analysis (or the error) per job, and the stage times the batch's images and
        aligned faces shared (``{"image": {...}, "aligned": {...}}``)."""
        results: list[Analysis | BaseException | None] = [None] * len(jobs)
        shared: dict[str, dict[str, float]] = {"image": {}, "aligned": {}}
        images, image_slots, image_decode_ms = [], [], []
        crops, crop_slots = [], []
        for i, job in enumerate(jobs):
            if isinstance(job, AlignedJob):
                try:
                    crops.append(job.crop if job.crop is not None
                                 else self._decode_aligned(job.data))
                except MatcherError as exc:
                    results[i] = exc
                    continue
                crop_slots.append(i)
                continue
            t = time.perf_counter()
            try:
                images.append(self.pipeline.decode_scaled(job.data))
            except MatcherError as exc:  # one bad image fails only its own request
                results[i] = exc
                continue
            image_slots.append(i)
            image_decode_ms.append((time.perf_counter() - t) * 1e3)
        if images:
            timings = StageTimings()
            per_image = self.pipeline.analyse_many(images, timings)
            # the batch's finer decodes (DecodeScaling), if any, are shared like its other stages
            finer_decode_ms = timings.ms.get("decode", 0.0)
            shared["image"] = dict(timings.ms)
            for slot, image, faces, decode_ms in zip(image_slots, images, per_image,
                                                     image_decode_ms, strict=True):
                faces = sorted(faces, key=lambda f: f.area, reverse=True)
                templates = (np.stack([f.template for f in faces]) if faces
                             else np.empty((0, EMBEDDING_DIM), np.float32))
                results[slot] = Analysis(faces, templates, True,
                                         {**timings.ms, "decode": decode_ms + finer_decode_ms},
                                         image.shape[:2])
        if crops:
            t = time.perf_counter()
            templates = self.pipeline.embed_aligned(np.stack(crops))
            embed_ms = (time.perf_counter() - t) * 1e3
            shared["aligned"] = {"embed": embed_ms}
            for row, slot in enumerate(crop_slots):
                results[slot] = Analysis([], templates[row:row + 1], False,
                                         {"embed": embed_ms})
        return results, shared  # type: ignore[return-value]

    def _decode_aligned(self, data: bytes) -> np.ndarray:
        crop = self.pipeline.decode(data)
        if crop.shape != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
            raise InvalidInput(f"an aligned face must be {ALIGNED_SIZE}x{ALIGNED_SIZE} pixels, "
                               f"got {crop.shape[1]}x{crop.shape[0]}")
        return crop

    def _search_batch(self, items: list[tuple[np.ndarray, int]]) -> list[list[Decision]]:
        """Items of (templates (m, 512), k) -> per item m decisions, from one gallery call.

        The batch asks for the largest k; each item's candidates are cut to its own k. A
        larger k cannot change a decision (it rests on the top two).
        """
        k = max(k for _, k in items)
        decisions = self.decider.identify_many(np.concatenate([t for t, _ in items]), k)
        out, row = [], 0
        for templates, own_k in items:
            mine = decisions[row:row + len(templates)]
            out.append([replace(d, candidates=d.candidates[:own_k]) for d in mine])
            row += len(templates)
        return out

    # -- async entry points -------------------------------------------------------------

    async def analyse(self, job: ImageJob | AlignedJob, deadline: float | None) -> Analysis:
        analysis, stats = await self.batcher.submit(job, deadline)
        if not isinstance(analysis, Analysis):  # one image or face in, one analysis out
            raise TypeError(f"an image job was analysed as {type(analysis).__name__}")
        analysis.timings_ms["queue"] = stats.queue_ms
        self._observe_stages(analysis.timings_ms)
        return analysis

    async def analyse_one(self, frame: Frame, deadline: float | None) -> Analysis:
        """One frame alone: a job through the model batcher, a template as it is."""
        if isinstance(frame, np.ndarray):
            return Analysis([], frame[None, :], False)
        return await self.analyse(frame, deadline)

    def _observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage in ("decode", "detect", "align", "embed"):
            if stage in timings_ms:
                self.metrics.observe_stage(stage, timings_ms[stage] / 1e3)

    async def analyse_frames(self, frames: Sequence[Frame], deadline: float | None
                             ) -> FusedProbe:
        """1..MAX_FRAMES frames of one traveller -> one FusedProbe.

        Jobs among the frames go to the model batcher as one FramesJob (one batch, never
        split); templates among them are taken as they are. A single frame is one plain
        job, exactly as a single probe always was. A frame that cannot be read fails the
        whole request, its message naming the frame.
        """
        check_frame_count(len(frames))
        positions = [i for i, f in enumerate(frames) if not isinstance(f, np.ndarray)]
        jobs = [f for f in frames if not isinstance(f, np.ndarray)]
        if len(frames) == 1:
            analysis = await self.analyse_one(frames[0], deadline)
            return fuse_frames([analysis], analysis.timings_ms)
        timings: dict[str, float] = {}
        analysed: list[Analysis] = []
        if jobs:
            result, stats = await self.batcher.submit(
                FramesJob(tuple(jobs), tuple(positions)), deadline)
            if not isinstance(result, FramesAnalysis):  # a frames job is analysed frame by frame
                raise TypeError(f"a frames job was analysed as {type(result).__name__}")
            timings = {**result.timings_ms, "queue": stats.queue_ms}
            self._observe_stages(timings)
            analysed = result.frames
        by_job = iter(analysed)
        analyses = [Analysis([], f[None, :], False) if isinstance(f, np.ndarray)
                    else next(by_job) for f in frames]
        return fuse_frames(analyses, timings, self.decider.same_person)

    async def _in_search_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._search_pool, fn, *args)

    async def identify(self, templates: np.ndarray, k: int, deadline: float | None = None
                       ) -> list[Decision]:
        """One decision per row of templates (n, 512), batched with other searches."""
        decisions, _ = await self.search_batcher.submit((templates, k), deadline)
        return decisions

    async def verify(self, template: np.ndarray, traveller_id: str) -> Decision:
        return await self._in_search_pool(self.decider.verify, template, traveller_id)

    async def clear(self, template: np.ndarray, claimed: str, k: int) -> Decision:
        if not claimed:
            decisions = await self.identify(template[None, :], k)
            return decisions[0]
        return await self._in_search_pool(
            lambda: self.decider.claim_then_search(template, claimed, k=k))

    async def _store_write(self, fn, deadline: float | None, *args):
        """Run a gallery write in the write pool, answering by ``deadline`` at the latest.

        The store waits for its lock only as long as the deadline leaves. If the write is
        still running when the deadline passes (a stalled fsync), the caller gets
        DeadlineExpired: the write is not acknowledged, and a retry is idempotent.
        """
        def run():
            wait_s = None if deadline is None else deadline - time.monotonic()
            if wait_s is not None and wait_s <= 0:
                raise DeadlineExpired("the deadline passed before the store could be written; "
                                      "nothing was written")
            return fn(*args, wait_s=wait_s)

        future = asyncio.get_running_loop().run_in_executor(self._write_pool, run)
        try:
            if deadline is None:
                return await future
            return await asyncio.wait_for(asyncio.shield(future),
                                          max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            expired = DeadlineExpired("the store did not confirm the write before the "
                                      "deadline; it is not acknowledged (a retry is safe)")
            self.metrics.count_store_failure(expired)
            raise expired from None
        except MatcherError as exc:
            self.metrics.count_store_failure(exc)
            raise

    async def enroll(self, traveller_id: str, templates: np.ndarray, valid_from: float,
                     valid_to: float, photo_sha256s: list[str],
                     deadline: float | None = None) -> EnrolResult:
        result = await self._store_write(self.gallery.enroll, deadline, traveller_id,
                                         templates, valid_from, valid_to, photo_sha256s)
        self.publish_gallery_metrics()
        return result

    async def remove(self, traveller_id: str, deadline: float | None = None) -> int:
        version = await self._store_write(self.gallery.remove, deadline, traveller_id)
        self.publish_gallery_metrics()
        return version

    async def get_traveller(self, traveller_id: str) -> Traveller:
        return await self._in_search_pool(self.gallery.get, traveller_id)

    async def searchable_travellers(self) -> int:
        """Travellers whose booking window is open now (a pass over the index)."""
        return await self._in_search_pool(self.gallery.searchable)

    async def record(self, kind: str, **fields) -> None:
        """Append one audit record (ids, decision, scores only); durable on return.

        If the log cannot be written (disk full, I/O error): a change (enrol, remove) is
        refused with AuditUnavailable, it is stored but not acknowledged and a retry is
        idempotent; a decision is refused too under ``audit_failure="fail_closed"`` (the
        default), or answered unaudited under ``"fail_open"`` (logged and counted).
        """
        if self.audit is None:
            return
        try:
            await asyncio.to_thread(self.audit.append, kind, **fields)
        except AuditUnavailable as exc:
            self.metrics.count_audit_failure()
            if kind != "decision":
                raise AuditUnavailable(f"{exc}; the change is stored but not acknowledged: "
                                       f"retry once the log can be written") from None
            if self.audit_failure == "fail_open":
                log.error("decision answered without its audit record (%s; "
                          "audit_failure=fail_open)", exc)
                return
            raise AuditUnavailable(f"{exc}; decisions are refused until it can be written "
                                   f"(audit_failure=fail_closed)") from None
