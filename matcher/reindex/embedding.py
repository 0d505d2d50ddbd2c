"""Embedding booking photos: photo path in, its faces or one reject reason out.

``PhotoEmbedder`` is the worker: a Ray Data actor on a cluster, or a plain object in this
process for ``--no-ray``; both give the same verdict for the same photo. ``embed_on_ray``
and ``embed_inline`` feed it the driver's work and hand back ``PhotoResult`` batches.
Everything Ray runs lives at module top level, since Ray workers import it by name.
Which face of a photo is enrolled is decided on the driver, once all of a booking's photos
are back (matcher.face.enrolment's ``choose_faces``, the rule Enroll follows too); a worker
refuses only what no booking could use (an unreadable photo, no face).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import (
    CorruptImage,
    DocumentUnreadable,
    EmptyImage,
    ImageTooLarge,
    InvalidInput,
    MatcherError,
)
from ..face.enrolment import NO_FACE, GivenFace, QualityVerdict
from ..face.models import ModelPack, default_pack
from ..face.pipeline import DecodedPhoto, DetectorConfig, Face, score_settings, settings_hash
from ..face.quality import DEFAULT_POLICY, QualityPolicy
from ..templates import EMBEDDING_DIM, photo_sha256
from ..transport import is_loopback
from .cache import unreadable_file_reason
from .manifest import UNREADABLE_IMAGE

log = logging.getLogger(__name__)

# Ray reads these when it is imported; set them before that, never overriding the
# operator's own choice: no usage report sent to the internet, no container CPU nag.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}
# Ray replaces 127.0.0.1 (as a node address or a cluster address) with the address of the
# interface that routes outwards, unless this is "0" (read once, when ray is imported; the
# name is about Windows/macOS, on Linux "0" changes only this and `ray start` of a worker).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EmbeddingConfig:
    """How the embedders run: the part of the re-index settings this module reads, built
    by ``ReindexConfig.embedding`` (the meanings and defaults live there). Ray actors get
    only the worker's own settings (``worker_kwargs``), never this whole.
    """

    ort_threads: int
    batch_size: int
    detector: DetectorConfig
    quality: QualityPolicy
    flip: bool
    model_pack: ModelPack | None
    ray_address: str | None
    num_cpus: int | None
    object_store_mb: int
    actors: int | None
    cpus_per_actor: float
    memory_per_actor_mb: int | None
    actor_start_timeout_s: float

    def worker_kwargs(self) -> dict[str, Any]:
        """``PhotoEmbedder``'s arguments: small frozen values, cheap to pickle to actors."""
        return {"ort_threads": self.ort_threads,
                "detector": self.detector, "quality": self.quality, "flip": self.flip,
                "model_pack": self.model_pack}

    @property
    def outcome_key(self) -> str:
        """Identifies everything that decides a photo's verdict besides its bytes: the
        fingerprint of the pipeline the workers build (``Pipeline.settings_hash``)."""
        pipeline = settings_hash(score_settings(self.model_pack or default_pack(),
                                                self.detector, self.quality, flip=self.flip))
        return hashlib.sha256(f"{pipeline} faces".encode()).hexdigest()[:16]


# -- the embedding worker (a Ray actor, or a plain object for --no-ray) -----------------

def _decode_reason(exc: InvalidInput) -> str:
    kind = ("empty" if isinstance(exc, EmptyImage) else
            "corrupt" if isinstance(exc, CorruptImage) else
            "too_large" if isinstance(exc, ImageTooLarge) else
            "document" if isinstance(exc, DocumentUnreadable) else "unsupported")
    return f"{UNREADABLE_IMAGE}:{kind}"


def read_photo(path: str) -> tuple[bytes | None, str]:
    """(bytes, "") or (None, reject reason) for a photo file."""
    try:
        with open(path, "rb") as f:
            return f.read(), ""
    except OSError as exc:
        return None, unreadable_file_reason(exc)


def ray_node_id() -> str:
    """The id of the Ray node this process runs on; "" outside Ray (never imports it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


class PhotoEmbedder:
    """Photo paths -> one template or one reject reason each. Loads the models once.

    Used as the Ray Data actor class (``__call__`` takes and returns a pyarrow Table) and,
    without Ray, through ``embed``. In: columns ``sha256`` (string, as hashed by the
    driver), ``path`` (binary, ``os.fsencode``). Out: ``sha256``, ``reason`` (string, ""
    when it has a face), ``faces`` (binary, ``pack_faces``; empty when refused),
    ``node_id`` (string, the Ray node that embedded it, "" without Ray).
    """

    def __init__(self, ort_threads: int = 1,
                 detector: DetectorConfig | None = None,
                 quality: QualityPolicy | None = None, flip: bool = False,
                 model_pack: ModelPack | None = None) -> None:
        from ..face.pipeline import Pipeline

        self.pipeline = Pipeline(model_pack, detector=detector or DetectorConfig(),
                                 quality=quality or DEFAULT_POLICY, threads=ort_threads,
                                 flip=flip)
        self.node_id = ray_node_id()  # an actor never moves: ask once

    def embed(self, shas: list[str], paths: list[str]) -> tuple[list[str], list[bytes]]:
        """(reasons, packed faces) for each photo, in order."""
        reasons = [""] * len(paths)
        packed = [b""] * len(paths)
        images, slots = [], []
        for i, (sha, path) in enumerate(zip(shas, paths, strict=True)):
            data, reason = read_photo(path)
            if data is None:
                reasons[i] = reason
                continue
            if photo_sha256(data) != sha:
                # Replaced between hashing and now: what we would embed is not the photo
                # the store would record. The next run sees the new file.
                reasons[i] = f"{UNREADABLE_IMAGE}:changed_during_run"
                continue
            try:
                images.append(self.pipeline.decode_scaled(data))
                slots.append(i)
            except InvalidInput as exc:
                reasons[i] = _decode_reason(exc)
        for i, image, faces in zip(slots, images, self._analyse(images, [paths[i] for i in slots]),
                                   strict=True):
            if faces is None:
                reasons[i] = f"{UNREADABLE_IMAGE}:pipeline_error"
            elif not faces:
                reasons[i] = NO_FACE
            else:
                packed[i] = pack_faces(faces, image.shape[:2])
        return reasons, packed

    def _analyse(self, images: list[DecodedPhoto], paths: list[str]
                 ) -> list[list[Face] | None]:
        """Faces per image, one batched run; if the batch fails, image by image so one
        pathological photo is refused instead of failing its neighbours (and the job)."""
        try:
            return list(self.pipeline.analyse_many(images))
        except Exception:  # noqa: BLE001 - isolated below, each failure is reported
            log.warning("a batch of %d photos failed; retrying one by one", len(images))
        results: list[list[Face] | None] = []
        for image, path in zip(images, paths, strict=True):
            try:
                results.append(self.pipeline.analyse(image))
            except Exception as exc:  # noqa: BLE001 - becomes a reject with a reason
                log.error("pipeline failed on %r: %s", path, type(exc).__name__)
                results.append(None)
        return results

    def __call__(self, batch):
        import pyarrow as pa

        shas = batch.column("sha256").to_pylist()
        paths = [os.fsdecode(p) for p in batch.column("path").to_pylist()]
        reasons, packed = self.embed(shas, paths)
        return pa.table({"sha256": pa.array(shas, pa.string()),
                         "reason": pa.array(reasons, pa.string()),
                         "faces": pa.array(packed, pa.binary()),
                         "node_id": pa.array([self.node_id] * len(shas), pa.string())})


@dataclass(frozen=True)
class PhotoResult:
    """One embedded photo as the driver sees it: a template, or the reason there is none."""

    sha256: str
    reason: str                     # "" when the photo has faces
    faces: list[GivenFace]          # every face, for the booking's enrolment rule
    shape: tuple[int, int] = (0, 0)  # the photo's full-size (height, width)
    node_id: str = ""               # the Ray node that embedded it; "" without Ray


# Per face: box (4), quality passed (1), then the template; little-endian float32.
_FACE_VALUES = 5 + EMBEDDING_DIM


def pack_faces(faces: list[Face], shape: tuple[int, int]) -> bytes:
    """A photo's faces as bytes for the driver: (height, width), then per face its box,
    whether it passes the quality gate and its template (float32), then the quality
    reasons as text. Boxes and reasons are what the enrolment rule reads; no image."""
    values = np.zeros((len(faces), _FACE_VALUES), "<f4")
    for row, face in zip(values, faces, strict=True):
        row[:4] = face.bbox[:4]
        row[4] = face.quality.accepted
        row[5:] = face.template
    reasons = "|".join("+".join(f.quality.reasons) for f in faces).encode()
    return (np.array(shape, "<f4").tobytes() + np.int32(len(faces)).tobytes()
            + values.tobytes() + reasons)


def unpack_faces(blob: bytes) -> tuple[list[GivenFace], tuple[int, int]]:
    """``pack_faces``'s faces (with their quality verdicts) and photo shape."""
    head = 12
    if len(blob) < head:
        raise MatcherError(f"an embedder returned {len(blob)} bytes of faces")
    height, width = np.frombuffer(blob[:8], "<f4")
    count = int(np.frombuffer(blob[8:12], "<i4")[0])
    end = head + count * _FACE_VALUES * 4
    if count < 1 or len(blob) < end:
        raise MatcherError(f"an embedder returned {len(blob)} bytes for {count} faces")
    values = np.frombuffer(blob[head:end], "<f4").reshape(count, _FACE_VALUES)
    reasons = blob[end:].decode().split("|")
    faces = []
    for row, why in zip(values, reasons, strict=True):
        box = row[:4].astype(np.float32)
        quality = QualityVerdict(bool(row[4]), tuple(r for r in why.split("+") if r))
        faces.append(GivenFace(row[5:].astype(np.float32), box,
                               float((box[2] - box[0]) * (box[3] - box[1])), quality))
    return faces, (int(height), int(width))


def _results(table) -> list[PhotoResult]:
    """An embedder's output table -> PhotoResults."""
    return _to_results(table.column("sha256").to_pylist(), table.column("reason").to_pylist(),
                       table.column("faces").to_pylist(),
                       table.column("node_id").to_pylist())


def _to_results(shas: list[str], reasons: list[str], blobs: list[bytes],
                nodes: list[str] | None = None) -> list[PhotoResult]:
    out = []
    for sha, reason, blob, node in zip(shas, reasons, blobs, nodes or [""] * len(shas),
                                       strict=True):
        if reason:
            out.append(PhotoResult(sha, reason, [], (0, 0), node))
        else:
            faces, shape = unpack_faces(blob)
            out.append(PhotoResult(sha, reason, faces, shape, node))
    return out


# -- running the embedders ------------------------------------------------------------

def embed_inline(work: list[tuple[str, str]], config: EmbeddingConfig,
                 timings: dict[str, float]) -> Generator[list[PhotoResult], None, None]:
    """The same worker in this process, one batch at a time (no Ray, no pyarrow)."""
    started = time.perf_counter()
    worker = PhotoEmbedder(**config.worker_kwargs())
    timings["embedder_start"] = time.perf_counter() - started
    for i in range(0, len(work), config.batch_size):
        shas = [sha for sha, _ in work[i:i + config.batch_size]]
        reasons, blobs = worker.embed(shas, [path for _, path in work[i:i + config.batch_size]])
        yield _to_results(shas, reasons, blobs)


def check_ray_installed() -> None:
    """MatcherError naming the fix when Ray (the ``cluster`` extra) is not installed."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except ValueError:  # a module without a spec: someone replaced it, treat as absent
        found = False
    if not found:
        raise MatcherError("Ray is not installed: pip install 'matcher[cluster]', "
                           "or run with --no-ray on one machine")


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` Ray address; None for
    ``auto`` and the other forms Ray resolves itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _keep_ray_on_loopback() -> None:
    """Make Ray keep 127.0.0.1 where we give it, for a Ray wholly on this host."""
    if os.environ.get(RAY_LOOPBACK_ENV) == "0":
        return
    if RAY_LOOPBACK_ENV in os.environ:
        log.warning("%s=%s: Ray will replace 127.0.0.1 by this host's interface address",
                    RAY_LOOPBACK_ENV, os.environ[RAY_LOOPBACK_ENV])
        return
    if "ray" in sys.modules:
        log.warning("ray was imported before the re-index set %s=0: Ray will replace "
                    "127.0.0.1 by this host's interface address", RAY_LOOPBACK_ENV)
    os.environ[RAY_LOOPBACK_ENV] = "0"


def _check_reachable(address: str, host: str, port: int) -> None:
    # ray.init retries an address nobody answers at for ever, silently; a night job must
    # fail with the reason instead.
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise MatcherError(f"cannot reach the Ray cluster at {address} ({exc}); give the "
                           f"head's address and port as 'ray start --head' printed them"
                           ) from None


def start_ray(config: EmbeddingConfig) -> bool:
    """Connect to ``config.ray_address`` or start a private local Ray; True if we started
    (or connected) it here and so must shut it down, False if the caller already had.

    Raises MatcherError when a ``host:port`` address does not answer.
    """
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_ray_installed()
    address = config.ray_address
    target = ray_host_port(address) if address else None
    if not address or (target is not None and is_loopback(target[0])):
        # Ray wholly on this host (a private instance, or a cluster whose nodes were
        # started on 127.0.0.1): everything it sends then stays on loopback.
        _keep_ray_on_loopback()
    if address and target is not None:
        _check_reachable(address, *target)
    import ray

    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        # A private single-node instance, nothing to start by hand, its node address
        # 127.0.0.1 (see docs/reindex.md for what listens where). address="local": never
        # join a cluster that some earlier `ray start` left behind.
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 object_store_memory=config.object_store_mb * 1024 * 1024,
                 _node_ip_address="127.0.0.1")
    return True


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Our own progress bar runs on the driver; Ray Data's would interleave with it.
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # It warns that bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def embed_on_ray(work: list[tuple[str, str]], config: EmbeddingConfig,
                 timings: dict[str, float]) -> Generator[list[PhotoResult], None, None]:
    """Ray Data: blocks of (sha256, path) -> actor pool of PhotoEmbedder -> driver."""
    started = time.perf_counter()
    owned = start_ray(config)
    timings["embedder_start"] = time.perf_counter() - started
    import ray
    import ray.data

    try:
        _quiet_ray_data()
        # Send photos only once every actor is up: otherwise the first actor ready takes
        # whole blocks before the others exist, and an actor that cannot be placed
        # (resources the cluster lacks) would leave the job waiting for ever.
        ray.data.DataContext.get_current().wait_for_min_actors_s = math.ceil(
            config.actor_start_timeout_s)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actors = config.actors or max(1, int(cpus // config.cpus_per_actor))
        actors = min(actors, max(1, -(-len(work) // config.batch_size)))
        import pyarrow as pa

        # Paths as file-system bytes: a name that is not valid UTF-8 still reaches the file.
        table = pa.table({"sha256": pa.array([s for s, _ in work], pa.string()),
                          "path": pa.array([os.fsencode(p) for _, p in work], pa.binary())})
        # Several blocks per actor keep every actor busy to the end; a cap on block count
        # keeps the driver's object references few for a 10M-row night.
        block_rows = max(config.batch_size, -(-len(work) // (actors * 8)), len(work) // 4096)
        blocks = [table.slice(i, block_rows) for i in range(0, len(work), block_rows)]
        ds = ray.data.from_arrow(blocks).map_batches(
            PhotoEmbedder,
            fn_constructor_kwargs=config.worker_kwargs(),
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=config.batch_size, num_cpus=config.cpus_per_actor,
            memory=(config.memory_per_actor_mb * 1024 * 1024
                    if config.memory_per_actor_mb else None),
            batch_format="pyarrow", zero_copy_batch=True)
        log.info("embedding %d photos on Ray with %d actors x %.3g CPU, %d ORT thread(s)",
                 len(work), actors, config.cpus_per_actor, config.ort_threads)
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield _results(out)
        except ray.exceptions.GetTimeoutError:
            res = ray.cluster_resources()
            raise MatcherError(
                f"the {actors} embedder actors were not all up after "
                f"{config.actor_start_timeout_s:g} s: each asks for "
                f"{config.cpus_per_actor:g} CPU"
                + (f" and {config.memory_per_actor_mb} MB" if config.memory_per_actor_mb
                   else "")
                + f", the cluster has {res.get('CPU', 0):g} CPUs and "
                f"{res.get('memory', 0) / 2**20:.0f} MB in all; ask for less, or allow "
                f"longer with --actor-start-timeout") from None
    finally:
        if owned:
            ray.shutdown()
