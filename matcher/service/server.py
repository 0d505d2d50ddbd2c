"""One ``serve()``: the gRPC server with health, reflection, auth, metrics, audit, hot swap.

The server listens at once with health NOT_SERVING (calls get UNAVAILABLE) while models
and the gallery load in the background, then flips to SERVING.

Drain (SIGTERM/SIGINT): health goes NOT_SERVING at once, so clients that health-check
(matcher.client, any gRPC client with a healthCheckConfig) stop sending new calls; for
``drain_notice_s`` the server still answers calls that were already on their way, then
it stops listening, gives in-flight calls ``grace_s`` to finish, and exits.

Stale replica: a replica whose snapshot is older than ``max_snapshot_age_s`` reports
NOT_SERVING for lane traffic (``matcher.v1.Matcher.lanes``) while staying SERVING for
``matcher.v1.Matcher``, so clients prefer fresher servers but may still use it when it is
the last one standing; ``matcher_replica_stale`` and a log line say so.

Message sizes and keepalive are matcher.transport.SERVER_OPTIONS, written beside the
client's half: the server accepts client pings every MIN_PING_INTERVAL_MS or more, also
without calls in flight, so a client that pings often to notice a stalled server is never
cut off.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import AuthConfigError, MatcherError, SnapshotError
from ..face.models import ModelPack
from ..face.pipeline import Pipeline
from ..gallery.codecs import codec_from_env
from ..gallery.decision import DecisionPolicy
from ..gallery.layout import SNAPSHOT_DIR
from ..gallery.replica import ReplicaGallery, SnapshotWatcher
from ..gallery.scoremodel import check_settings, load_score_model
from ..gallery.snapshot import (
    PRUNE_AFTER_S,
    SNAPSHOTS_KEPT,
    list_snapshots,
    snapshot_version,
    snapshot_written_at,
)
from ..transport import (
    DEFAULT_LISTEN,
    LANE_HEALTH_SERVICE,
    SERVER_OPTIONS,
    SERVICE,
    server_credentials,
    split_host_port,
)
from ..v1 import matcher_pb2 as pb
from .audit import AUDIT_FILE, AuditLog
from .auditing import AUDIT_FAILURE_POLICIES
from .auth import TokenAuthInterceptor, TokenBook, check_exposure
from .batching import BatchConfig
from .demo import enrol_demo_gallery
from .engine import MatchEngine
from .metrics import Metrics, MetricsServer, start_metrics_server
from .sdnotify import Notifier
from .servicer import MatcherServicer
from .serving import ServingState

if TYPE_CHECKING:  # the writer's gallery is imported only by a writer
    from ..gallery.primary import PrimaryGallery
    from ..gallery.scoremodel import ScoreModel

log = logging.getLogger(__name__)

DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
# An unchanged gallery is published again after this many publishing intervals: a
# replica's --max-snapshot-age above that many intervals then means "the writer is lost".
KEEPALIVE_INTERVALS = 3


def default_data_dir() -> Path:
    """$MATCHER_DATA, else ~/.matcher."""
    env = os.environ.get("MATCHER_DATA")
    return Path(env) if env else Path.home() / ".matcher"


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = field(default_factory=default_data_dir)
    role: str = "writer"                    # "writer" owns the store; "replica" serves snapshots
    snapshot_source: Path | None = None     # replica: the writer's snapshots/ folder
    watch_interval_s: float = 2.0
    batch: BatchConfig = field(default_factory=BatchConfig)
    ort_threads: int = 1                    # per worker; see batching.BatchConfig
    search_threads: int = 2
    policy: DecisionPolicy = field(default_factory=DecisionPolicy)
    score_model: Path | None = None         # None: the one shipped for the model pack
    model_pack: ModelPack | None = None     # None: the packaged default pack
    flip_augment: bool = False              # Pipeline(flip=...): docs/pipeline.md
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None       # set: mutual TLS, clients need a cert from this CA
    tokens_file: Path | None = None
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    audit_path: Path | None = None          # default: data_dir/audit.log
    # What Identify/Verify/Clear do while the audit log cannot be written (disk full, I/O
    # error): "fail_closed" refuses them (UNAVAILABLE), "fail_open" answers unaudited.
    audit_failure: str = "fail_closed"
    demo: bool = False
    grace_s: float = 10.0
    # SIGTERM: seconds of NOT_SERVING while still answering, before the listener closes,
    # so health-checking clients move away before a call can be refused.
    drain_notice_s: float = 1.0
    # Replica: NOT_SERVING for lane traffic while its snapshot is older than this (None:
    # never). Set it above the writer's publishing interval.
    max_snapshot_age_s: float | None = None
    # Writer: every this many seconds, publish a snapshot if the gallery changed (and one
    # unchanged every KEEPALIVE_INTERVALS of them, so replicas can tell a quiet writer
    # from a lost one); 0: only on PublishSnapshot and after the overnight job.
    publish_interval_s: float = 300.0
    snapshots_kept: int = SNAPSHOTS_KEPT
    snapshot_prune_after_s: float = PRUNE_AFTER_S
    max_concurrent_rpcs: int = 256

    @property
    def snapshot_folder(self) -> Path:
        """The snapshots a replica serves, or those the writer publishes."""
        if self.role == "replica" and self.snapshot_source is not None:
            return self.snapshot_source
        return self.data_dir / SNAPSHOT_DIR

    def __post_init__(self) -> None:
        if self.role not in ("writer", "replica"):
            raise AuthConfigError(f"role must be writer or replica, got {self.role!r}")
        if self.role == "replica" and self.snapshot_source is None:
            raise AuthConfigError("a replica needs --snapshots DIR (the writer's snapshots)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise AuthConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise AuthConfigError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")
        if self.max_snapshot_age_s is not None and self.max_snapshot_age_s <= 0:
            raise AuthConfigError(f"max_snapshot_age_s must be positive, got "
                                  f"{self.max_snapshot_age_s}")
        if self.grace_s < 0 or self.drain_notice_s < 0:
            raise AuthConfigError("grace_s and drain_notice_s must not be negative")
        if self.publish_interval_s < 0 or self.snapshot_prune_after_s < 0:
            raise AuthConfigError("publish_interval_s and snapshot_prune_after_s must not "
                                  "be negative")
        if self.snapshots_kept < 1:
            raise AuthConfigError(f"snapshots_kept must be >= 1, got {self.snapshots_kept}")
        if self.audit_failure not in AUDIT_FAILURE_POLICIES:
            raise AuthConfigError(f"audit_failure must be one of {AUDIT_FAILURE_POLICIES}, "
                                  f"got {self.audit_failure!r}")


def _tolerant_deserializer(message_class):
    """FromString that returns None for bytes that are not a message of this type, so the
    servicer can answer INVALID_ARGUMENT (grpc's own default would be UNKNOWN)."""
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return None
    return deserialize


def _refusing_undecodable(behaviour, type_name: str):
    async def unary(request, context):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {type_name} message")
        return await behaviour(request, context)
    return unary


def _add_servicer(servicer: MatcherServicer, server: grpc.aio.Server) -> None:
    """Register every Matcher method, as the generated add_MatcherServicer_to_server does,
    but with deserializers that turn undecodable bytes into INVALID_ARGUMENT. Streaming
    methods get None items, which the servicer answers with a per-item error."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Matcher"].methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        kw = {"request_deserializer": _tolerant_deserializer(request_class),
              "response_serializer": response_class.SerializeToString}
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **kw)
        elif method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.name}: half-streaming methods are not wired here")
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(behaviour, method.input_type.full_name), **kw)
    name = pb.DESCRIPTOR.services_by_name["Matcher"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _setup_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def _set_health(servicer: health.aio.HealthServicer, status: int,
                      names: tuple[str, ...] = ("", SERVICE, LANE_HEALTH_SERVICE)) -> None:
    for name in names:
        await servicer.set(name, status)


class RunningServer:
    """A started server; ``await wait_ready()`` then use ``port``; ``await stop()``."""

    def __init__(self, config: ServerConfig, server: grpc.aio.Server, port: int,
                 serving: ServingState, health_servicer: health.aio.HealthServicer,
                 metrics: Metrics, metrics_server: MetricsServer | None) -> None:
        self.config = config
        self.server = server
        self.port = port
        self.serving = serving
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_server = metrics_server
        self.engine: MatchEngine | None = None
        self.gallery: PrimaryGallery | ReplicaGallery | None = None
        self.audit: AuditLog | None = None
        self.watcher: SnapshotWatcher | None = None
        self._loader: asyncio.Task | None = None
        self._cancel_load = threading.Event()
        self._freshness: asyncio.Task | None = None
        self._publishing: asyncio.Task | None = None
        self._publish_now: asyncio.Future | None = None  # a scheduled publish under way
        self._published: tuple[int, float] | None = None  # (gallery_version, when)
        self.stale = False
        self.draining = False

    @property
    def address(self) -> str:
        host, _ = split_host_port(self.config.listen)
        return f"{host}:{self.port}"

    @property
    def loading(self) -> asyncio.Task:
        """Loads models and gallery, then turns SERVING; done when that is, or failed."""
        if self._loader is None:
            raise RuntimeError("the server was not started (use start_server)")
        return self._loader

    def start_loading(self, pipeline: Pipeline | None) -> None:
        self._loader = asyncio.create_task(self._load_and_serve(pipeline))

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return once SERVING; re-raise the loading error if loading failed."""
        await asyncio.wait_for(asyncio.shield(self.loading), timeout)

    async def drain(self, notice: float | None = None) -> None:
        """NOT_SERVING for every health name, then keep answering for ``notice`` seconds
        (calls already on their way land here) before ``stop`` closes the listener."""
        notice = self.config.drain_notice_s if notice is None else notice
        self.draining = True
        self.metrics.set_lane_serving(False)
        await self.health.enter_graceful_shutdown()
        log.info("draining: health NOT_SERVING; listener closes in %.1f s", notice)
        if notice > 0:
            await asyncio.sleep(notice)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_s if grace is None else grace
        self._cancel_load.set()
        for task in (self._freshness, self._publishing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._publish_now is not None:  # let a snapshot being written finish first
            await asyncio.gather(self._publish_now, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)   # refuses new calls, lets in-flight ones finish
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        if self.engine is not None:
            await self.engine.stop()
        if self.gallery is not None:
            await asyncio.to_thread(self.gallery.close)
        if self.audit is not None:
            self.audit.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("server on %s stopped", self.address)

    # -- loading --------------------------------------------------------------------

    def _open_gallery(self, pipeline: Pipeline) -> PrimaryGallery | ReplicaGallery:
        config = self.config
        if config.role == "replica":
            while True:
                try:
                    return ReplicaGallery.open(config.snapshot_folder, pipeline.model_id)
                except SnapshotError as exc:
                    log.info("replica waiting for a snapshot: %s", exc)
                if self._cancel_load.wait(config.watch_interval_s):
                    raise MatcherError("stopped while waiting for a first snapshot")
        from ..gallery.primary import GalleryConfig, PrimaryGallery

        # Encrypted at rest when MATCHER_TEMPLATE_KEY(_FILE) is set, as the overnight job.
        gallery = PrimaryGallery.open(
            config.data_dir, pipeline.model_id,
            GalleryConfig(snapshots_kept=config.snapshots_kept,
                          snapshot_prune_after_s=config.snapshot_prune_after_s),
            codec=codec_from_env())
        if config.demo:
            try:
                self._check_not_stopped()
                enrol_demo_gallery(pipeline, gallery)
            except BaseException:
                gallery.close()
                raise
        return gallery

    def _check_not_stopped(self) -> None:
        """Between the load's steps: give up once stop() was called (the thread that
        loads cannot be cancelled, only asked to stop)."""
        if self._cancel_load.is_set():
            raise MatcherError("stopped while loading models and gallery")

    def _load(self, pipeline: Pipeline | None
              ) -> tuple[Pipeline, PrimaryGallery | ReplicaGallery, ScoreModel, AuditLog]:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        pipeline = pipeline or Pipeline(config.model_pack, threads=config.ort_threads,
                                        flip=config.flip_augment)
        # Refuse before the gallery loads: thresholds from another pipeline would not hold.
        score_model = load_score_model(pipeline.model_id, config.score_model)
        check_settings(score_model, pipeline.settings_hash(), pipeline.model_id)
        # The audit log before the gallery: a damaged one refuses start-up at once, and a
        # gallery that fails to open leaves no log file open behind it.
        self._check_not_stopped()
        audit = AuditLog(config.audit_path or config.data_dir / AUDIT_FILE)
        try:
            gallery = self._open_gallery(pipeline)
        except BaseException:
            audit.close()
            raise
        return pipeline, gallery, score_model, audit

    async def _load_in_thread(self, pipeline: Pipeline | None
                              ) -> tuple[Pipeline, PrimaryGallery | ReplicaGallery, ScoreModel,
                                         AuditLog]:
        """``_load`` in a thread. Cancelling the await does not stop the thread: a stop()
        during the load waits for it and closes the store and audit log it opened, so
        the store's files and lock are not left held by a server that never served."""
        loading = asyncio.ensure_future(asyncio.to_thread(self._load, pipeline))
        try:
            return await asyncio.shield(loading)
        except asyncio.CancelledError:
            await asyncio.wait({loading})
            if not loading.cancelled() and loading.exception() is None:
                _, gallery, _, audit = loading.result()
                await asyncio.to_thread(gallery.close)
                audit.close()
                log.info("stopped while loading: closed the gallery and audit log it opened")
            raise

    async def _load_and_serve(self, pipeline: Pipeline | None) -> None:
        config = self.config
        started = time.monotonic()
        models, gallery, score_model, audit = await self._load_in_thread(pipeline)
        self.gallery, self.audit = gallery, audit
        engine = MatchEngine(models, gallery, config.batch, config.policy,
                             self.metrics, audit, config.search_threads, score_model,
                             audit_failure=config.audit_failure)
        engine.start()
        self.engine = engine
        replica = config.role == "replica"
        self.watcher = SnapshotWatcher(gallery, config.snapshot_folder, config.watch_interval_s,
                                       self._on_swap, track_source=replica,
                                       on_source=self.metrics.set_snapshot_source
                                       if replica else None)
        # Before the watcher starts, so a swap it makes at once is not overwritten.
        if isinstance(gallery, ReplicaGallery):
            self.metrics.set_snapshot_source(True)
            self.metrics.set_snapshot(gallery.snapshot_created_at)
            self.serving.loaded(engine, snapshot_name=gallery.snapshot_name)
        else:
            self.serving.loaded(engine, publish=self._publish)
            newest = list_snapshots(config.snapshot_folder)
            if newest:
                self._published = (snapshot_version(newest[0]),
                                   snapshot_written_at(newest[0]))
        self.watcher.start()
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.set_lane_serving(True)
        if replica and config.max_snapshot_age_s is not None:
            self._freshness = asyncio.create_task(self._watch_freshness(),
                                                  name="snapshot-freshness")
        if not replica and config.publish_interval_s > 0:
            self._publishing = asyncio.create_task(self._publish_on_schedule(),
                                                   name="snapshot-publisher")
        log.info("serving %s as %s: model %s, gallery_version %d, %d travellers (%s), "
                 "ready in %.1f s", self.address, config.role, engine.model_id,
                 gallery.version, gallery.size, gallery.index_kind,
                 time.monotonic() - started)
        point = engine.decider.point_1toN()
        log.info("operating points: 1:1 FMR %g -> threshold %.4f; 1:N FPIR %g over the %d "
                 "travellers whose booking is open now (of %d in the gallery) -> threshold "
                 "%.4f; the calibration data supports FPIR %g up to %d travellers%s",
                 config.policy.fmr_1to1, engine.decider.point_1to1.threshold,
                 config.policy.fpir_1toN, point.gallery_size, gallery.size,
                 point.threshold, config.policy.fpir_1toN, point.max_gallery_size,
                 "" if point.supported else " (EXCEEDED: 1:N answers are flagged; use Clear)")

    def _replica(self) -> ReplicaGallery:
        if not isinstance(self.gallery, ReplicaGallery):
            raise RuntimeError("not a loaded replica: only a replica serves another's snapshots")
        return self.gallery

    def snapshot_age_s(self) -> float:
        """Age of the served snapshot (a replica's), from its manifest's created_at."""
        return max(0.0, time.time() - self._replica().snapshot_created_at)

    async def _watch_freshness(self) -> None:
        """Replica: step aside from lane traffic while the served snapshot is too old."""
        limit = self.config.max_snapshot_age_s
        if limit is None:
            return
        interval = min(self.config.watch_interval_s, limit / 4)
        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        while True:
            age = self.snapshot_age_s()
            stale = age > limit
            if stale != self.stale and not self.draining:
                self.stale = stale
                self.metrics.set_replica_stale(stale)
                self.metrics.set_lane_serving(not stale)
                await _set_health(self.health, not_serving if stale else serving,
                                  (LANE_HEALTH_SERVICE,))
                if stale:
                    log.warning("replica stale: snapshot %s is %.0f s old (max %.0f s; is the "
                                "writer publishing, is %s reachable?); NOT_SERVING for lane "
                                "traffic (%s) until a newer one arrives; clients use this "
                                "server only while no fresher one is SERVING",
                                self._replica().snapshot_name, age, limit,
                                self.config.snapshot_source, LANE_HEALTH_SERVICE)
                else:
                    log.warning("replica fresh again: snapshot %s is %.0f s old; SERVING for "
                                "lane traffic", self._replica().snapshot_name, age)
            await asyncio.sleep(interval)

    async def _publish_on_schedule(self) -> None:
        """Writer: every publishing interval, publish if the gallery changed since the
        newest snapshot (or that one is KEEPALIVE_INTERVALS old), so replicas follow
        enrolments without anyone calling PublishSnapshot."""
        interval = self.config.publish_interval_s
        log.info("publishing a snapshot every %.0f s when the gallery changed", interval)
        while True:
            await asyncio.sleep(interval)
            gallery = self.gallery
            if gallery is None:
                continue
            published = self._published
            if (published is None or gallery.version != published[0]
                    or time.time() - published[1] >= KEEPALIVE_INTERVALS * interval):
                # Shielded: a stop while it runs waits for it (stop() gathers it) instead
                # of closing the store under a snapshot being written.
                self._publish_now = asyncio.ensure_future(self._publish())
                try:
                    await asyncio.shield(self._publish_now)
                except asyncio.CancelledError:
                    raise
                except Exception:  # disk full, I/O error: the next interval tries again
                    log.exception("scheduled snapshot publish failed; next try in %.0f s",
                                  interval)

    def _on_swap(self, manifest) -> None:
        """Runs in the watcher thread after a hot swap."""
        self.serving.snapshot_served(manifest.path.name)
        if self.config.role == "writer":  # the overnight job's snapshot: already published
            self._published = (manifest.gallery_version, manifest.created_at)
        if self.config.role == "replica":
            self.metrics.set_snapshot(manifest.created_at)
        if self.engine is not None:
            self.engine.publish_gallery_metrics()
        if self.audit is not None:
            self.audit.append("snapshot_swap", snapshot=manifest.path.name,
                              gallery_version=manifest.gallery_version,
                              model_id=manifest.model_id)

    async def _publish(self) -> tuple[str, int]:
        from ..gallery.primary import PrimaryGallery

        gallery, watcher = self.gallery, self.watcher
        if not isinstance(gallery, PrimaryGallery) or watcher is None:
            raise RuntimeError("not a loaded writer: only the writer publishes snapshots")

        def publish() -> tuple[str, int]:
            gallery.rebuild()
            path = watcher.publish(gallery.export_snapshot)
            return path.name, gallery.version

        name, version = await asyncio.to_thread(publish)
        # What the snapshot holds: changes that landed while it was written are not in it.
        self._published = (snapshot_version(Path(name)), time.time())
        self.serving.snapshot_served(name)
        log.info("published snapshot %s (gallery_version %d)", name, version)
        return name, version


async def start_server(config: ServerConfig, pipeline: Pipeline | None = None
                       ) -> RunningServer:
    """Bind and start serving (UNAVAILABLE until loaded); returns at once.

    ``pipeline``: reuse already-loaded models (tests); None loads the packaged ones.
    """
    tokens = TokenBook.from_file(config.tokens_file) if config.tokens_file else None
    tls = config.tls_cert is not None
    check_exposure(config.listen, tls, tokens)
    serving = ServingState(config.role)
    servicer = MatcherServicer(serving)
    interceptors = [TokenAuthInterceptor(tokens)] if tokens else []
    server = grpc.aio.server(interceptors=interceptors, options=list(SERVER_OPTIONS),
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    _add_servicer(servicer, server)
    health_servicer = _setup_health(server)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Matcher"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if config.tls_cert is not None and config.tls_key is not None:  # both or neither
        port = server.add_secure_port(config.listen, server_credentials(
            config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise AuthConfigError(f"could not listen on {config.listen}")
    metrics = Metrics()
    metrics.watch_disk(config.data_dir)
    metrics.set_lane_serving(False)
    metrics.set_replica_stale(False)
    metrics_server = None
    if config.metrics_listen:
        host, mport = split_host_port(config.metrics_listen)
        metrics_server = start_metrics_server(metrics, host, mport)
        # The bound port (port 0 picks a free one): what a scraper, or a test, reads back.
        log.info("metrics on http://%s:%d/metrics", host, metrics_server.port)
    await server.start()
    running = RunningServer(config, server, port, serving, health_servicer, metrics,
                            metrics_server)
    log.info("listening on %s (%s, tls=%s, mtls=%s, auth=%s); loading models and gallery",
             running.address, config.role, tls, config.tls_client_ca is not None,
             tokens is not None)
    running.start_loading(pipeline)
    return running


async def serve(config: ServerConfig, on_ready=None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully. ``on_ready(running)`` is
    awaited once the server is SERVING (the demo uses it to make its first call).

    Under a systemd notify unit: READY=1 once SERVING, WATCHDOG=1 while serving, and
    STOPPING=1 on the signal, before the drain closes the listener (service/sdnotify.py).
    """
    notifier = Notifier.from_env()
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchdog: asyncio.Task | None = None
    try:
        waiter = asyncio.create_task(stop.wait())
        loader = running.loading
        done, _ = await asyncio.wait({waiter, loader}, return_when=asyncio.FIRST_COMPLETED)
        if loader in done:
            loader.result()  # a loading failure ends serve() with its error
            notifier.notify("READY=1", f"STATUS=serving on {running.address} as "
                                       f"{config.role}")
            watchdog = asyncio.create_task(notifier.watchdog(), name="systemd-watchdog")
            if on_ready is not None:
                await on_ready(running)
            await waiter
        notifier.notify("STOPPING=1", "STATUS=draining")
        if loader in done:
            await running.drain()
    finally:
        log.info("shutting down: finishing in-flight calls (grace %.0f s)", config.grace_s)
        await running.stop()
        if watchdog is not None:  # pinged through the drain: a slow stop is not a hang
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        notifier.close()
        log.info("drained and stopped")
