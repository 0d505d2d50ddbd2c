"""What the service does with a probe, in numpy terms: batched face analysis
(analysis.py), frame fusion (matcher.face.frames), gallery decisions, enrolment
(store_writes.py), audit (auditing.py). servicer.py turns protos into calls on this and
back.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from ..face.frames import Analysis, FusedProbe, check_frame_count, fuse_frames
from ..face.pipeline import Pipeline
from ..gallery.decision import Decider, Decision, DecisionPolicy, consistency_threshold
from ..gallery.scoremodel import ScoreModel, check_settings
from ..gallery.served import ServedGallery
from ..gallery.store import EnrolResult, Traveller
from .analysis import (
    AlignedJob,
    BatchAnalyser,
    Frame,
    FramesAnalysis,
    FramesJob,
    ImageJob,
    Job,
    job_weight,
)
from .audit import AuditLog
from .auditing import Auditor
from .batching import BatchConfig, MicroBatcher
from .metrics import Metrics
from .store_writes import StoreWrites

SEARCH_BATCH = 64  # probes per 1:N gallery call


class MatchEngine:
    """Pipeline + batcher + gallery + decider + audit, for one running server."""

    def __init__(self, pipeline: Pipeline, gallery: ServedGallery,
                 batch: BatchConfig = BatchConfig(), policy: DecisionPolicy | None = None,
                 metrics: Metrics | None = None, audit: AuditLog | None = None,
                 search_threads: int = 2, score_model: ScoreModel | None = None, *,
                 audit_failure: str = "fail_closed") -> None:
        self.pipeline = pipeline
        self.gallery = gallery
        self.decider = Decider(gallery, policy, score_model)
        check_settings(self.decider.score_model, pipeline.settings_hash(), pipeline.model_id,
                       gallery.model_id)
        self.consistency_threshold = consistency_threshold(self.decider.score_model,
                                                           self.decider.policy)
        self.metrics = metrics or Metrics()
        self.auditor = Auditor(audit, self.metrics, audit_failure)
        self.batcher: MicroBatcher[Job, Analysis | FramesAnalysis] = MicroBatcher(
            BatchAnalyser(pipeline), batch, name="models",
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
        self.writes = StoreWrites(self.metrics)
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
        self.writes.shutdown()

    def publish_gallery_metrics(self) -> None:
        self.metrics.set_gallery(self.gallery.template_count, self.gallery.version)

    # -- the search batch function (runs in the search batcher's worker) ------------

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

    async def enroll(self, traveller_id: str, templates: np.ndarray, valid_from: float,
                     valid_to: float, photo_sha256s: list[str],
                     deadline: float | None = None) -> EnrolResult:
        result = await self.writes.run(self.gallery.enroll, deadline, traveller_id,
                                       templates, valid_from, valid_to, photo_sha256s)
        self.publish_gallery_metrics()
        return result

    async def remove(self, traveller_id: str, deadline: float | None = None) -> int:
        version = await self.writes.run(self.gallery.remove, deadline, traveller_id)
        self.publish_gallery_metrics()
        return version

    async def get_traveller(self, traveller_id: str) -> Traveller:
        return await self._in_search_pool(self.gallery.get, traveller_id)

    async def searchable_travellers(self) -> int:
        """Travellers whose booking window is open now (a pass over the index)."""
        return await self._in_search_pool(self.gallery.searchable)

    async def record(self, kind: str, **fields) -> None:
        """Append one audit record, durable on return, under the audit-failure policy
        (auditing.Auditor)."""
        await self.auditor.record(kind, **fields)
