"""The overnight re-index driver: bookings manifest -> embedders -> store -> snapshot.

The driver is the store's only writer: a traveller whose photos are all back joins a
batch committed in one fsynced transaction, so an interrupted run resumes after the last
committed batch. It then deletes the travellers no longer booked, rebuilds the index and
publishes a snapshot, which a running ``matcher serve`` on the same data dir picks up.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import InvalidInput, MatcherError, UnknownTraveller
from ..face.enrolment import (
    PHOTOS_DISAGREE,
    BookingPhoto,
    EnrolmentRule,
    GivenFace,
    choose_faces,
)
from ..face.models import ModelPack, default_pack
from ..face.pipeline import DetectorConfig
from ..face.quality import DEFAULT_POLICY, QualityPolicy
from ..gallery.codecs import TemplateCodec, codec_from_env
from ..gallery.decision import DecisionPolicy, consistency_threshold
from ..gallery.primary import STORE_FILE, GalleryConfig, PrimaryGallery
from ..gallery.scoremodel import load_score_model
from ..gallery.snapshot import PRUNE_AFTER_S, SNAPSHOTS_KEPT, SnapshotManifest, verify_snapshot
from ..gallery.store import Enrolment, Store, TravellerSummary
from ..templates import EMBEDDING_DIM
from .cache import OUTCOMES_FILE, OutcomeCache, booking_key, hash_photos, remember_reject
from .embedding import EmbeddingConfig, PhotoResult, check_ray_installed, embed_inline, embed_on_ray
from .manifest import Booking, Manifest, Reject, load_manifest
from .report import REJECTS_FILE, SUMMARY_FILE, Progress, Summary, write_rejects, write_summary

log = logging.getLogger(__name__)

LOCK_FILE = "reindex.lock"
MIN_STEADY_S = 1.0  # a steady rate measured over less than this is noise
# The embedders: (sha256, path) work, their config, the timings dict -> result batches.
Embed = Callable[[list[tuple[str, str]], EmbeddingConfig, dict[str, float]],
                 Generator[list[PhotoResult], None, None]]


@dataclass(frozen=True)
class ReindexConfig:
    """What to re-index and how. Ray settings only matter when ``use_ray`` is true.

    actors: embedder actors (default: the cluster's CPUs // cpus_per_actor).
    memory_per_actor_mb: memory Ray reserves per actor when placing it (default: none;
        one actor holds the two models plus a batch of decoded photos).
    num_cpus: CPUs of the local Ray instance (default: what Ray detects, cgroup-aware);
        ignored with ``ray_address``.
    now: UTC epoch seconds deciding which bookings are over (default: the clock at start).
    policy: the decision targets; ``fmr_consistency`` sets the enrolment rule's
        consistency threshold, with the shipped score model of the model pack, as Enroll's
        (matcher.face.enrolment), so both judge a booking the same way.
    store_batch_travellers, store_batch_ms: completed travellers are committed to the
        store together, one fsynced transaction per batch, once this many are waiting or
        the oldest has waited this long (checked as results arrive). A hard crash
        (power cut, SIGKILL) loses at most the uncommitted batch; the next run embeds it
        again. 1 means one transaction per traveller.
    actor_start_timeout_s: photos are sent once every actor is up (models loaded), so
        each gets a share; a cluster that cannot place them all by then fails the run.
    """

    manifest: Path
    data_dir: Path
    rejects_path: Path | None = None
    use_ray: bool = True
    ray_address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    memory_per_actor_mb: int | None = None
    ort_threads: int = 1
    batch_size: int = 8
    num_cpus: int | None = None
    object_store_mb: int = 500
    hash_threads: int = 8
    now: float | None = None
    progress: bool = True
    policy: DecisionPolicy = field(default_factory=DecisionPolicy)
    store_batch_travellers: int = 256
    store_batch_ms: float = 1000.0
    actor_start_timeout_s: float = 600.0
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    quality: QualityPolicy = DEFAULT_POLICY
    flip: bool = False  # flip augmentation, as the server's pipeline (docs/pipeline.md)
    # The model pack, as the server's (None: the packaged one with the fp32 embedder): the
    # job must make the templates the server it feeds compares.
    model_pack: ModelPack | None = None
    # The score model the enrolment rule's consistency threshold comes from, as the
    # server's --score-model (None: the one shipped for the pack).
    score_model: Path | None = None
    # Pruning of the snapshot it publishes, as the writer's (gallery/snapshot.py).
    snapshots_kept: int = SNAPSHOTS_KEPT
    snapshot_prune_after_s: float = PRUNE_AFTER_S

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.ort_threads < 1 or self.hash_threads < 1:
            raise InvalidInput("batch_size, ort_threads and hash_threads must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise InvalidInput("actors must be >= 1")
        if not self.cpus_per_actor > 0:
            raise InvalidInput("cpus_per_actor must be > 0")
        if self.memory_per_actor_mb is not None and self.memory_per_actor_mb < 1:
            raise InvalidInput("memory_per_actor_mb must be >= 1")
        if self.store_batch_travellers < 1 or not self.store_batch_ms >= 0:
            raise InvalidInput("store_batch_travellers must be >= 1 and store_batch_ms >= 0")
        if not self.actor_start_timeout_s > 0:
            raise InvalidInput("actor_start_timeout_s must be > 0")
        if self.snapshots_kept < 1 or not self.snapshot_prune_after_s >= 0:
            raise InvalidInput("snapshots_kept must be >= 1 and snapshot_prune_after_s >= 0")

    @property
    def pack(self) -> ModelPack:
        """The model pack the job embeds with."""
        return self.model_pack or default_pack()

    @property
    def embedding(self) -> EmbeddingConfig:
        """What the embedders (matcher.reindex.embedding) are run with."""
        # Each of its fields is one of ours, of the same name.
        return EmbeddingConfig(**{f.name: getattr(self, f.name)
                                  for f in fields(EmbeddingConfig)})


def run_reindex(config: ReindexConfig,
                embed: Embed | None = None) -> Summary:
    """Run the whole job; returns its Summary (also written to the data dir).

    ``embed`` defaults to ``embed_on_ray`` (or ``embed_inline`` when ``use_ray`` is off);
    it is called with ``config.embedding``.
    Raises only for a job that cannot run at all (unreadable manifest, store of another
    model); bad rows become rejects.
    """
    t0 = time.perf_counter()
    if embed is None:
        embed = embed_on_ray if config.use_ray else embed_inline
        if config.use_ray:
            check_ray_installed()  # before anything is written, not halfway through
    summary = Summary()
    now = config.now if config.now is not None else time.time()
    manifest: Manifest = load_manifest(config.manifest, now)
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with JobLock(data_dir):
        return _run_locked(config, embed, manifest, data_dir, summary, t0)


def _run_locked(config: ReindexConfig, embed: Embed,
                manifest: Manifest, data_dir: Path, summary: Summary, t0: float) -> Summary:
    seconds = summary.seconds
    rejects_path = Path(config.rejects_path or data_dir / REJECTS_FILE)
    rejects = list(manifest.rejects)
    summary.rows, summary.duplicates = manifest.rows, manifest.duplicates
    summary.bookings, summary.expired = len(manifest.bookings), len(manifest.expired)

    t = time.perf_counter()
    digests = hash_photos((b.photo for b in manifest.bookings), config.hash_threads)
    seconds["hash"] = time.perf_counter() - t

    model_id, codec = config.pack.model_id, codec_from_env()
    # Writes go to the Store, not through a PrimaryGallery: it would also hold every new
    # template in its in-memory index, which a night of millions cannot afford. The index
    # is built once, from the store, at the end.
    store = Store.open(data_dir / STORE_FILE, model_id, codec)
    embedding = config.embedding
    cache = OutcomeCache(data_dir / OUTCOMES_FILE, embedding.outcome_key)
    rule = EnrolmentRule(consistency_threshold(load_score_model(model_id, config.score_model),
                                               config.policy))
    try:
        stored = {t.traveller_id: t for t in store.list_travellers()}
        plans, work = _plan(manifest.bookings, digests, stored, cache, summary, rejects)
        waiting: dict[str, list[str]] = defaultdict(list)
        writer = _Writer(store, stored, summary, config.store_batch_travellers,
                         config.store_batch_ms)
        judge = _Judge(rule, store, cache, rejects)
        for traveller_id, plan in plans.items():
            for sha in plan.pending:
                waiting[sha].append(traveller_id)
            if not plan.pending:
                writer.finish(traveller_id, plan)

        t = time.perf_counter()
        progress = Progress(len(work), config.progress)
        by_node: Counter[str] = Counter()
        # closing(): an error while writing must stop the embedders (and our Ray) now.
        # No work: no embedder (and no Ray) is started at all.
        with progress, (closing(embed(list(work.items()), embedding, seconds)) if work
                        else nullcontext(())) as batches:
            steady = _embed_and_enrol(batches, waiting, plans, writer, judge, cache, rejects,
                                      progress, by_node)
        summary.embedded = progress.done
        summary.photos_by_node = dict(sorted(by_node.items()))
        seconds["embed"] = time.perf_counter() - t - seconds.get("embedder_start", 0.0)
        summary.steady_photos_per_s = steady
        if summary.embedded and seconds["embed"] > 0:
            summary.photos_per_s = summary.embedded / seconds["embed"]

        t = time.perf_counter()
        writer.remove_unbooked()
        seconds["removals"] = time.perf_counter() - t
        cache.keep_only({s for p in plans.values() for s in p.rows})
    finally:
        cache.close()
        store.close()

    t = time.perf_counter()
    verified = publish_snapshot(data_dir, model_id, codec,
                                GalleryConfig(auto_rebuild=False,
                                              snapshots_kept=config.snapshots_kept,
                                              snapshot_prune_after_s=config.snapshot_prune_after_s))
    seconds["index_and_publish"] = time.perf_counter() - t
    summary.gallery_travellers = verified.travellers
    summary.gallery_templates = verified.template_count
    summary.gallery_version = verified.gallery_version
    summary.snapshot = str(verified.path)

    summary.rejected = len(rejects)
    summary.rejects_by_reason = dict(Counter(r.code for r in rejects))
    write_rejects(rejects_path, rejects)
    summary.rejects_file = str(rejects_path)
    seconds["total"] = time.perf_counter() - t0
    write_summary(data_dir / SUMMARY_FILE, summary)
    log.info("reindex done: %d embedded, %d skipped, %d rejected, %d removed; snapshot %s",
             summary.embedded, summary.skipped, summary.rejected, summary.removed,
             Path(summary.snapshot).name)
    return summary


@dataclass
class _Plan:
    """Per traveller: window, photo digests wanted, digests still being embedded."""

    valid_from: float
    valid_to: float
    rows: dict[str, Booking] = field(default_factory=dict)  # sha256 -> first row with it
    pending: set[str] = field(default_factory=set)
    embedded: dict[str, PhotoResult] = field(default_factory=dict)  # back with faces
    new: dict[str, np.ndarray] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)

    @cached_property
    def booking_key(self) -> str:
        """Names this exact set of photos: a refusal that depends on the booking's other
        photos is remembered for it alone."""
        return booking_key(self.rows)  # read once ``rows`` is complete (after _plan's loop)


def _plan(bookings: list[Booking], digests: dict[Path, tuple[str | None, str]],
          stored: dict[str, TravellerSummary], cache: OutcomeCache, summary: Summary,
          rejects: list[Reject]) -> tuple[dict[str, _Plan], dict[str, str]]:
    """Per traveller: which photos are kept (already stored), refused (missing, or
    remembered as refused) or to be embedded. Returns the plans and the work:
    sha256 -> path, each distinct photo once even if several travellers list it."""
    plans: dict[str, _Plan] = {}
    for b in bookings:
        plan = plans.setdefault(b.traveller_id, _Plan(b.valid_from, b.valid_to))
        sha, reason = digests[b.photo]
        if sha is None:
            rejects.append(Reject(b.row, b.traveller_id, reason))
        elif sha in plan.rows:
            summary.duplicates += 1  # another file with the very same bytes
        else:
            plan.rows[sha] = b
    remembered = cache.get_many({s for p in plans.values() for s in p.rows})
    in_booking = cache.get_many_in({(s, p.booking_key) for p in plans.values() for s in p.rows})
    work: dict[str, str] = {}
    for traveller_id, plan in plans.items():
        have = stored.get(traveller_id)
        for sha, b in plan.rows.items():
            reason = remembered.get(sha) or in_booking.get((sha, plan.booking_key), "")
            if have is not None and sha in have.photo_sha256s:
                plan.kept.add(sha)
                summary.skipped += 1
            elif reason:
                rejects.append(Reject(b.row, traveller_id, reason))
                summary.remembered_rejects += 1
            else:
                plan.pending.add(sha)
                work.setdefault(sha, str(b.photo))
    return plans, work


class _Writer:
    """The store's single writer during a run: enrols (in batches), replaces, removes.

    A traveller counts as enrolled only once its batch has committed; until then it is
    in memory only and a crash means it is embedded again next run.
    """

    def __init__(self, store: Store, stored: dict[str, TravellerSummary],
                 summary: Summary, batch_travellers: int = 1, batch_ms: float = 0.0
                 ) -> None:
        self.store = store
        self.stored = stored
        self.summary = summary
        self.final: set[str] = set()
        self.batch_travellers = batch_travellers
        self.batch_s = batch_ms / 1e3
        self._queue: list[Enrolment] = []
        self._queued_at = 0.0  # monotonic time the oldest queued traveller was complete

    def finish(self, traveller_id: str, plan: _Plan) -> None:
        have = self.stored.get(traveller_id)
        wanted = plan.kept | set(plan.new)
        if not wanted:
            if have is not None:
                self._remove(traveller_id)
            return
        self.final.add(traveller_id)
        window = (plan.valid_from, plan.valid_to)
        stale = have.photo_sha256s - wanted if have is not None else frozenset()
        moved = have is not None and (have.valid_from, have.valid_to) != window
        if stale or (moved and not plan.new):
            # Photos dropped from the booking (their templates must go) or only the window
            # moved: one atomic replace, so the traveller is never missing in between.
            self._replace(traveller_id, plan, window)
        elif plan.new:
            self._enqueue(Enrolment(traveller_id, np.stack(list(plan.new.values())),
                                    window[0], window[1], list(plan.new)))
        else:
            self.summary.unchanged += 1

    def _enqueue(self, enrolment: Enrolment) -> None:
        if not self._queue:
            self._queued_at = time.monotonic()
        self._queue.append(enrolment)
        if len(self._queue) >= self.batch_travellers:
            self.flush()

    def flush_if_due(self) -> None:
        """Commit the queue if its oldest traveller has waited ``batch_ms``."""
        if self._queue and time.monotonic() - self._queued_at >= self.batch_s:
            self.flush()

    def flush(self) -> None:
        """Commit every queued traveller in one durable transaction."""
        if not self._queue:
            return
        self.store.enroll_many(self._queue)
        self.summary.enrolled += len(self._queue)
        self._queue = []

    def flush_after_error(self) -> None:
        """The run is failing: still commit the queued travellers (complete and valid) so
        the next run need not embed them again. A failure here is logged; the caller
        re-raises the error that stopped the run."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - logged; the original error is what matters
            log.exception("could not commit %d queued travellers while stopping; the next "
                          "run embeds them again", len(self._queue))

    def _replace(self, traveller_id: str, plan: _Plan, window: tuple[float, float]) -> None:
        shas = list(plan.new)
        templates = (np.stack([plan.new[s] for s in shas]) if shas
                     else np.empty((0, EMBEDDING_DIM), np.float32))
        try:
            self.store.replace_templates(traveller_id, sorted(plan.kept), templates, shas,
                                         window[0], window[1])
        except UnknownTraveller:
            # Removed meanwhile through the service's admin API, kept templates and all;
            # left out tonight, the next run enrols them from their photos again.
            log.warning("a traveller was removed during the run; left out until next run")
            return
        self.summary.enrolled += 1

    def _remove(self, traveller_id: str) -> None:
        try:
            self.store.remove(traveller_id)
        except UnknownTraveller:  # removed meanwhile through the service's admin API
            return
        self.summary.removed += 1

    def remove_unbooked(self) -> None:
        """Delete every stored traveller the new manifest does not keep."""
        for traveller_id in self.stored:
            if traveller_id not in self.final:
                self._remove(traveller_id)


class _Judge:
    """Applies the enrolment rule to a booking once all its photos are back: the photos
    embedded tonight, checked against the traveller's photos already stored."""

    def __init__(self, rule: EnrolmentRule, store: Store, cache: OutcomeCache,
                 rejects: list[Reject]) -> None:
        self.rule = rule
        self.store = store
        self.cache = cache
        self.rejects = rejects

    def __call__(self, traveller_id: str, plan: _Plan) -> None:
        if not plan.embedded:
            return
        shas = list(plan.embedded)
        anchors = []
        if plan.kept:
            have = self.store.get(traveller_id)
            anchors = [BookingPhoto([GivenFace(t)], (0, 0), enrolled=True)
                       for t, sha in zip(have.templates, have.photo_sha256s, strict=True)
                       if sha in plan.kept]
        booking = anchors + [BookingPhoto(plan.embedded[s].faces, plan.embedded[s].shape)
                             for s in shas]
        verdicts = choose_faces(booking, self.rule)[len(anchors):]
        refused = []
        for sha, verdict in zip(shas, verdicts, strict=True):
            if verdict.face is not None:
                plan.new[sha] = verdict.face.template
            else:
                self.rejects.append(Reject(plan.rows[sha].row, traveller_id, verdict.reason))
                refused.append((sha, verdict.reason))
        if any(reason == PHOTOS_DISAGREE for _, reason in refused):
            log.warning("booking refused (%s): its %d photos show different people; "
                        "see rejects.csv", PHOTOS_DISAGREE, len(booking))
        self.cache.put_many_in([(sha, plan.booking_key, reason) for sha, reason in refused])
        plan.embedded.clear()


def _embed_and_enrol(batches: Iterable[list[PhotoResult]], waiting: dict[str, list[str]],
                     plans: dict[str, _Plan], writer: _Writer, judge: _Judge,
                     cache: OutcomeCache, rejects: list[Reject], progress: Progress,
                     by_node: Counter[str]) -> float | None:
    """Consume the embedders' results: queue each traveller for the store once all its
    photos are back; committed in batches, the last one (also on the way out of an error)
    before this returns. Counts the photos each Ray node embedded into ``by_node``.

    Returns the steady rate in photos/s: from the first batch back to the last, not
    counting the first batch (its time is start-up: processes, models, first run); None
    when too few batches came back over too short a time to say.
    """
    first_at = last_at = 0.0
    first_size = 0
    try:
        for batch in batches:
            last_at = time.perf_counter()
            if not first_size:
                first_at, first_size = last_at, len(batch)
            progress.update(len(batch))
            by_node.update(r.node_id for r in batch if r.node_id)
            cache.put_many([(r.sha256, r.reason) for r in batch if remember_reject(r.reason)])
            for result in batch:
                for traveller_id in waiting.pop(result.sha256, ()):
                    plan = plans[traveller_id]
                    plan.pending.discard(result.sha256)
                    if not result.reason:
                        plan.embedded[result.sha256] = result
                    else:
                        rejects.append(Reject(plan.rows[result.sha256].row, traveller_id,
                                              result.reason))
                    if not plan.pending:
                        judge(traveller_id, plan)
                        writer.finish(traveller_id, plan)
            writer.flush_if_due()
    except BaseException:
        writer.flush_after_error()
        raise
    writer.flush()
    if waiting:
        raise MatcherError(f"the embedders returned no result for {len(waiting)} photos")
    steady = last_at - first_at
    if steady < MIN_STEADY_S:
        return None
    return (progress.done - first_size) / steady


class JobLock:
    """One re-index per data dir at a time: a cron job that overlaps a slow night fails
    at once with a clear message instead of racing the other run's removals."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> JobLock:
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise MatcherError(f"another reindex is running on {self.path.parent} "
                               f"(pid {holder}); wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


def publish_snapshot(data_dir: Path, model_id: str, codec: TemplateCodec | None,
                     config: GalleryConfig | None = None) -> SnapshotManifest:
    """Build the index from the store (bookings already over are left out), write the
    snapshot atomically where ``matcher serve`` watches, and verify it from disk."""
    config = config or GalleryConfig(auto_rebuild=False)
    with PrimaryGallery.open(data_dir, model_id, config, codec=codec,
                             use_snapshots=False) as gallery:
        path = gallery.export_snapshot()
        return verify_snapshot(path, gallery.model_id, gallery.store.store_id)
