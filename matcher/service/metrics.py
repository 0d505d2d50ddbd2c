"""Prometheus metrics of the matching service, on a registry of its own.

Every label value comes from a small closed set (stage, decision kind, RPC name, rejection
reason, model id) or a capped one (lane ids: the first MAX_LANES a server sees, the rest
"other"), so cardinality stays bounded: traveller ids, request ids, scores and anything
derived from a face never become labels.
"""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest, start_http_server

STAGES: tuple[str, ...] = ("decode", "detect", "align", "embed", "search", "total")
DECISIONS: tuple[str, ...] = ("MATCH", "NO_MATCH", "NO_FACE", "LOW_QUALITY", "ERROR")
REJECT_REASONS: tuple[str, ...] = ("overload", "deadline", "not_ready")
STORE_FAILURES: tuple[str, ...] = ("disk_full", "busy", "io", "deadline")

# Fine where CPU stages fall (docs/service.md#observability); the tail buckets catch a
# stalled request without a +Inf cliff.
STAGE_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.040, 0.050,
    0.075, 0.100, 0.150, 0.200, 0.250, 0.400, 0.750, 1.5)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# RPC names come from the service, not from callers; still cap them so a bug cannot
# grow the series set without bound.
_RPC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
MAX_RPC_NAMES = 32
OTHER_RPC = "other"
# Lane ids come from the lane daemons: a border post has tens of lanes. The label takes
# the first MAX_LANES plain ids a server sees; any other is "other", none is "none".
_LANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}$")
MAX_LANES = 64
OTHER_LANE, NO_LANE = "other", "none"


class Metrics:
    """All of the service's metrics, registered on ``self.registry`` (never the global one).

    Several instances can live in one process (one per test server) without clashing.
    """

    def __init__(self, namespace: str = "matcher") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._rpcs: set[str] = set()
        self._lanes: set[str] = set()
        self._rpc_lock = threading.Lock()
        r = self.registry
        self.stage_seconds = Histogram(
            "stage_seconds", "Wall time of one pipeline stage for one request",
            ["stage"], namespace=namespace, buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "batch_size", "Frames (photos, aligned faces) per micro-batch sent to the models",
            namespace=namespace, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for a micro-batch", namespace=namespace, registry=r)
        self.decisions = Counter(
            "decisions", "Answers given, by RPC and decision kind",
            ["rpc", "decision"], namespace=namespace, registry=r)
        self.lane_decisions = Counter(
            "lane_decisions", "Decisions given, by lane (the caller's lane_id) and decision "
            "kind", ["lane", "decision"], namespace=namespace, registry=r)
        self.rejected = Counter(
            "requests_rejected", "Requests refused before any work (overload, deadline)",
            ["reason"], namespace=namespace, registry=r)
        self.gallery_size = Gauge(
            "gallery_size", "Templates stored for the live gallery's travellers, one per "
            "booking photo (GalleryInfo.templates)", namespace=namespace, registry=r)
        self.gallery_version = Gauge(
            "gallery_version", "Version number of the live gallery snapshot",
            namespace=namespace, registry=r)
        self.gallery_swapped = Gauge(
            "gallery_swap_timestamp_seconds", "Unix time the live gallery last changed",
            namespace=namespace, registry=r)
        self.model = Info("model", "The face models in use", namespace=namespace, registry=r)
        self.store_failures = Counter(
            "store_write_failures", "Gallery writes refused by the disk or a held lock "
            "(nothing written)", ["reason"], namespace=namespace, registry=r)
        self.audit_failures = Counter(
            "audit_write_failures", "Audit records that could not be written",
            namespace=namespace, registry=r)
        self.snapshot_source_up = Gauge(
            "snapshot_source_up", "1 while the snapshot folder a replica reads is reachable",
            namespace=namespace, registry=r)
        self.snapshot_created = Gauge(
            "snapshot_created_timestamp_seconds", "Unix time the served snapshot was written",
            namespace=namespace, registry=r)
        self.snapshot_age = Gauge(
            "snapshot_age_seconds", "Age of the served snapshot (how stale a replica is)",
            namespace=namespace, registry=r)
        self._snapshot_created_at: float | None = None
        self.snapshot_age.set_function(self._snapshot_age)
        self.lane_serving = Gauge(
            "lane_serving", "1 while this server reports SERVING for lane traffic (loaded, "
            "not draining, not a stale replica)", namespace=namespace, registry=r)
        self.replica_stale = Gauge(
            "replica_stale", "1 while this replica's snapshot is older than "
            "--max-snapshot-age (it steps aside from lane traffic)",
            namespace=namespace, registry=r)
        self.disk_free = Gauge(
            "data_disk_free_bytes", "Bytes free to this process on the disk holding the "
            "data directory (store, snapshots, audit log)", namespace=namespace, registry=r)
        self.disk_size = Gauge(
            "data_disk_size_bytes", "Size of the disk holding the data directory",
            namespace=namespace, registry=r)
        self._data_dir: Path | None = None
        self.disk_free.set_function(lambda: self._disk(free=True))
        self.disk_size.set_function(lambda: self._disk(free=False))
        for reason in STORE_FAILURES:
            self.store_failures.labels(reason=reason)
        for stage in STAGES:  # expose zeroed series so dashboards see every stage at once
            self.stage_seconds.labels(stage=stage)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage's wall time in seconds; ``stage`` is one of STAGES."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage_seconds.labels(stage=stage).observe(max(0.0, float(seconds)))

    def observe_batch(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a batch holds at least one frame, got: size={size}")
        self.batch_size.observe(size)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(max(0, int(n)))

    def count_decision(self, rpc: str, decision: str, lane_id: str | None = None) -> None:
        """Count one answer; ``decision`` is one of DECISIONS, ``rpc`` the method name,
        ``lane_id`` the caller's lane when the answer is a decision for one."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; expected one of {DECISIONS}")
        self.decisions.labels(rpc=self._rpc_label(rpc), decision=decision).inc()
        if lane_id is not None:
            self.lane_decisions.labels(lane=self._lane_label(lane_id), decision=decision).inc()

    def count_rejected(self, reason: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; "
                             f"expected one of {REJECT_REASONS}")
        self.rejected.labels(reason=reason).inc()

    def set_gallery(self, size: int, version: int | str) -> None:
        """Publish the live gallery's stored templates and snapshot version.

        ``version`` is an integer (or a string of digits); anything else is refused so a
        free-form string can never end up in the exposition.
        """
        if isinstance(version, str) and not version.isdigit():
            raise ValueError(f"gallery version must be an integer, got: {version!r}")
        self.gallery_size.set(int(size))
        self.gallery_version.set(int(version))
        self.gallery_swapped.set(time.time())

    def count_store_failure(self, exc: BaseException) -> None:
        """Count a refused gallery write by its kind of failure (other errors: ignored)."""
        from ..errors import DeadlineExpired, DiskFull, StorageUnavailable, StoreBusy

        if isinstance(exc, DiskFull):
            reason = "disk_full"
        elif isinstance(exc, StoreBusy):
            reason = "busy"
        elif isinstance(exc, DeadlineExpired):
            reason = "deadline"
        elif isinstance(exc, StorageUnavailable):
            reason = "io"
        else:
            return
        self.store_failures.labels(reason=reason).inc()

    def count_audit_failure(self) -> None:
        self.audit_failures.inc()

    def set_snapshot(self, created_at: float) -> None:
        """The served snapshot's manifest ``created_at`` (age is computed at scrape)."""
        self._snapshot_created_at = float(created_at)
        self.snapshot_created.set(float(created_at))

    def set_snapshot_source(self, reachable: bool) -> None:
        self.snapshot_source_up.set(1 if reachable else 0)

    def set_lane_serving(self, serving: bool) -> None:
        self.lane_serving.set(1 if serving else 0)

    def set_replica_stale(self, stale: bool) -> None:
        self.replica_stale.set(1 if stale else 0)

    def watch_disk(self, data_dir: str | Path) -> None:
        """Report the free and total bytes of the disk holding ``data_dir`` (at scrape)."""
        self._data_dir = Path(data_dir)

    def _disk(self, free: bool) -> float:
        if self._data_dir is None:
            return float("nan")
        try:
            st = os.statvfs(self._data_dir)
        except OSError:
            return float("nan")
        return float((st.f_bavail if free else st.f_blocks) * st.f_frsize)

    def _snapshot_age(self) -> float:
        created = self._snapshot_created_at
        return float("nan") if created is None else max(0.0, time.time() - created)

    def set_model_info(self, model_id: str, **details: str) -> None:
        """Model identity, e.g. ``set_model_info("buffalo_l", detector="det_10g")``."""
        self.model.info({"model_id": str(model_id), **{k: str(v) for k, v in details.items()}})

    def render(self) -> bytes:
        """The text exposition of this registry (what /metrics serves)."""
        return generate_latest(self.registry)

    def _lane_label(self, lane_id: str) -> str:
        if not lane_id:
            return NO_LANE
        if not _LANE_ID.match(lane_id):
            return OTHER_LANE
        with self._rpc_lock:
            if lane_id in self._lanes:
                return lane_id
            if len(self._lanes) >= MAX_LANES:
                return OTHER_LANE
            self._lanes.add(lane_id)
            return lane_id

    def _rpc_label(self, rpc: str) -> str:
        if not _RPC_NAME.match(rpc):
            return OTHER_RPC
        with self._rpc_lock:
            if rpc in self._rpcs:
                return rpc
            if len(self._rpcs) >= MAX_RPC_NAMES:
                return OTHER_RPC
            self._rpcs.add(rpc)
            return rpc


class MetricsServer:
    """A running /metrics endpoint; ``close()`` stops it and frees the port."""

    def __init__(self, httpd, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``metrics`` at http://host:port/metrics from a daemon thread.

    The port is separate from gRPC so scraping never competes with lane traffic; port 0
    picks a free one (read it back from ``.port``).
    """
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(httpd, thread)
