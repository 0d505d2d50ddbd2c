"""The overnight re-index: bookings manifest -> templates on Ray -> store -> index -> snapshot.

One driver, many embedders. The driver reads and checks the manifest, hashes every photo,
and sends only photos whose sha256 is not yet in the store (for that traveller and this
store's model) to a Ray Data actor pool; each actor builds one ``Pipeline`` and turns a
batch of photo paths into templates or reject reasons. The driver is the store's only
writer: each traveller whose photos are all back joins a batch that is committed in one
fsynced transaction (``Store.enroll_many``; a few hundred travellers or a second's worth,
whichever comes first), so an interrupted run resumes after the last committed batch. It
then deletes the travellers who are no longer booked, rebuilds the index and publishes a
snapshot, which a running ``matcher serve`` on the same data dir picks up.

Photos that were refused for what they contain (no face, several faces, low quality,
undecodable) are remembered by sha256 and pipeline settings in a small side file, so a
rerun does no embedding work at all for an unchanged manifest.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import math
import os
import socket
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import (CorruptImage, EmptyImage, ImageTooLarge, InvalidInput, MatcherError,
                      UnknownTraveller)
from ..face.models import default_pack
from ..face.pipeline import DecodedPhoto, DetectorConfig, Face, largest_face
from ..face.quality import DEFAULT_POLICY, QualityPolicy
from ..gallery.codecs import TemplateCodec
from ..gallery.primary import STORE_FILE, Gallery, GalleryConfig
from ..gallery.snapshot import SnapshotManifest, verify_snapshot
from ..gallery.store import Enrolment, Store, TravellerSummary
from ..templates import EMBEDDING_DIM
from ..transport import is_loopback
from .manifest import (LOW_QUALITY, MISSING_FILE, MULTIPLE_FACES, NO_FACE, UNREADABLE_IMAGE,
                       Booking, Manifest, Reject, load_manifest)

log = logging.getLogger(__name__)

REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "reindex-summary.json"
OUTCOMES_FILE = "reindex-outcomes.sqlite3"
LOCK_FILE = "reindex.lock"
HASH_CHUNK = 1 << 20
MIN_STEADY_S = 1.0  # a steady rate measured over less than this is noise
# Reject reasons that depend only on the photo's bytes and the pipeline settings: safe to
# remember by sha256. A missing file may appear tomorrow, so it is never remembered.
CACHEABLE_CODES = (UNREADABLE_IMAGE, NO_FACE, MULTIPLE_FACES, LOW_QUALITY)
# ...except these two, which say something about this run, not about the photo.
TRANSIENT_REASONS = (f"{UNREADABLE_IMAGE}:changed_during_run",
                     f"{UNREADABLE_IMAGE}:pipeline_error")

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
class ReindexConfig:
    """What to re-index and how. Ray settings only matter when ``use_ray`` is true.

    actors: embedder actors (default: the cluster's CPUs // cpus_per_actor).
    memory_per_actor_mb: memory Ray reserves per actor when placing it (default: none;
        one actor holds the two models, ~30 MB, plus a batch of decoded photos).
    num_cpus: CPUs of the local Ray instance (default: what Ray detects, cgroup-aware);
        ignored with ``ray_address``.
    now: UTC epoch seconds deciding which bookings are over (default: the clock at start).
    second_face_area_ratio: a second face at least this fraction of the largest face's
        area makes the photo ambiguous (``multiple_faces``); smaller faces are bystanders.
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
    second_face_area_ratio: float = 0.1
    store_batch_travellers: int = 256
    store_batch_ms: float = 1000.0
    actor_start_timeout_s: float = 600.0
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    quality: QualityPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.ort_threads < 1 or self.hash_threads < 1:
            raise InvalidInput("batch_size, ort_threads and hash_threads must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise InvalidInput("actors must be >= 1")
        if not self.cpus_per_actor > 0:
            raise InvalidInput("cpus_per_actor must be > 0")
        if self.memory_per_actor_mb is not None and self.memory_per_actor_mb < 1:
            raise InvalidInput("memory_per_actor_mb must be >= 1")
        if not 0.0 < self.second_face_area_ratio <= 1.0:
            raise InvalidInput("second_face_area_ratio must be in (0, 1]")
        if self.store_batch_travellers < 1 or not self.store_batch_ms >= 0:
            raise InvalidInput("store_batch_travellers must be >= 1 and store_batch_ms >= 0")
        if not self.actor_start_timeout_s > 0:
            raise InvalidInput("actor_start_timeout_s must be > 0")

    @property
    def outcome_key(self) -> str:
        """Identifies everything that decides a photo's verdict besides its bytes."""
        text = repr((default_pack().model_id, self.detector, self.quality,
                     self.second_face_area_ratio))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Summary:
    """What a run did; written as JSON beside the rejects file and printed at the end."""

    rows: int = 0
    bookings: int = 0             # rows accepted for the new gallery (before photo checks)
    duplicates: int = 0           # rows repeating an earlier row's traveller and photo
    expired: int = 0              # rows whose booking window is already over
    embedded: int = 0             # photos that went through the pipeline this run
    skipped: int = 0              # photos whose template was already stored
    remembered_rejects: int = 0   # photos refused earlier, not embedded again
    rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    enrolled: int = 0             # travellers added or changed in the store
    unchanged: int = 0
    removed: int = 0              # travellers deleted (cancelled, expired or no good photo)
    gallery_travellers: int = 0
    gallery_templates: int = 0
    gallery_version: int = 0
    snapshot: str = ""
    rejects_file: str = ""
    photos_per_s: float = 0.0     # embedded / embedding time (embedder start-up included)
    steady_photos_per_s: float | None = None  # after the first batch; None: too few batches
    photos_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> embedded
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejects_by_reason.items()))
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return [
            f"manifest rows {self.rows}: bookings {self.bookings}, expired {self.expired}, "
            f"duplicates {self.duplicates}",
            f"photos: embedded {self.embedded} ({self.photos_per_s:.1f} photos/s"
            + (f", {self.steady_photos_per_s:.1f} once started"
               if self.steady_photos_per_s is not None else "")
            + (f", on {len(self.photos_by_node)} Ray node(s)" if self.photos_by_node else "")
            + "), "
            f"skipped {self.skipped} (already stored), "
            f"remembered rejects {self.remembered_rejects}",
            f"rejected rows {self.rejected}" + (f" ({reasons})" if reasons else ""),
            f"travellers: enrolled or changed {self.enrolled}, unchanged {self.unchanged}, "
            f"removed {self.removed}",
            f"gallery: {self.gallery_travellers} travellers, {self.gallery_templates} "
            f"templates at gallery_version {self.gallery_version}",
            f"snapshot: {self.snapshot}",
            f"rejects: {self.rejects_file}",
            f"time: {times}",
        ]


# -- the embedding worker (a Ray actor, or a plain object for --no-ray) -----------------

def _decode_reason(exc: InvalidInput) -> str:
    kind = ("empty" if isinstance(exc, EmptyImage) else
            "corrupt" if isinstance(exc, CorruptImage) else
            "too_large" if isinstance(exc, ImageTooLarge) else "unsupported")
    return f"{UNREADABLE_IMAGE}:{kind}"


def face_verdict(faces: list[Face], second_face_area_ratio: float) -> tuple[Face | None, str]:
    """The one enrolable face of a booking photo, or None and the reject reason."""
    main = largest_face(faces)
    if main is None:
        return None, NO_FACE
    if any(f is not main and f.area >= second_face_area_ratio * main.area for f in faces):
        return None, MULTIPLE_FACES
    if not main.quality.accepted:
        return None, f"{LOW_QUALITY}:{'+'.join(main.quality.reasons)}"
    return main, ""


def remember_reject(reason: str) -> bool:
    """Whether a reject reason is a property of the photo's bytes (worth remembering)."""
    return (bool(reason) and reason.split(":", 1)[0] in CACHEABLE_CODES
            and reason not in TRANSIENT_REASONS)


def unreadable_file_reason(exc: OSError) -> str:
    """The reject reason for a photo file that cannot be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return MISSING_FILE
    if isinstance(exc, IsADirectoryError):
        return f"{MISSING_FILE}:is_a_directory"
    if isinstance(exc, PermissionError):
        return f"{MISSING_FILE}:permission_denied"
    return f"{MISSING_FILE}:{type(exc).__name__}"


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
    when enrolable), ``template`` (binary, 512 little-endian float32, L2-normalised;
    empty when refused), ``node_id`` (string, the Ray node that embedded it, "" without
    Ray).
    """

    def __init__(self, ort_threads: int = 1, second_face_area_ratio: float = 0.1,
                 detector: DetectorConfig | None = None,
                 quality: QualityPolicy | None = None) -> None:
        from ..face.pipeline import Pipeline

        self.pipeline = Pipeline(detector=detector or DetectorConfig(),
                                 quality=quality or DEFAULT_POLICY, threads=ort_threads)
        self.second_face_area_ratio = second_face_area_ratio
        self.node_id = ray_node_id()  # an actor never moves: ask once

    def embed(self, shas: list[str], paths: list[str]) -> tuple[list[str], list[bytes]]:
        """(reasons, template bytes) for each photo, in order."""
        reasons = [""] * len(paths)
        templates = [b""] * len(paths)
        images, slots = [], []
        for i, (sha, path) in enumerate(zip(shas, paths)):
            data, reason = read_photo(path)
            if data is None:
                reasons[i] = reason
                continue
            if hashlib.sha256(data).hexdigest() != sha:
                # Replaced between hashing and now: what we would embed is not the photo
                # the store would record. The next run sees the new file.
                reasons[i] = f"{UNREADABLE_IMAGE}:changed_during_run"
                continue
            try:
                images.append(self.pipeline.decode_scaled(data))
                slots.append(i)
            except InvalidInput as exc:
                reasons[i] = _decode_reason(exc)
        for i, faces in zip(slots, self._analyse(images, [paths[i] for i in slots])):
            if faces is None:
                reasons[i] = f"{UNREADABLE_IMAGE}:pipeline_error"
                continue
            face, reasons[i] = face_verdict(faces, self.second_face_area_ratio)
            if face is not None:
                templates[i] = np.ascontiguousarray(face.template, "<f4").tobytes()
        return reasons, templates

    def _analyse(self, images: list[DecodedPhoto], paths: list[str]
                 ) -> list[list[Face] | None]:
        """Faces per image, one batched run; if the batch fails, image by image so one
        pathological photo is refused instead of failing its neighbours (and the job)."""
        try:
            return list(self.pipeline.analyse_many(images))
        except Exception:  # noqa: BLE001 - isolated below, each failure is reported
            log.warning("a batch of %d photos failed; retrying one by one", len(images))
        results: list[list[Face] | None] = []
        for image, path in zip(images, paths):
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
        reasons, templates = self.embed(shas, paths)
        return pa.table({"sha256": pa.array(shas, pa.string()),
                         "reason": pa.array(reasons, pa.string()),
                         "template": pa.array(templates, pa.binary()),
                         "node_id": pa.array([self.node_id] * len(shas), pa.string())})


@dataclass(frozen=True)
class PhotoResult:
    sha256: str
    reason: str                     # "" when the photo gave a template
    template: np.ndarray | None     # (512,) float32 L2-normalised, or None
    node_id: str = ""               # the Ray node that embedded it; "" without Ray


def _results(table) -> list[PhotoResult]:
    """An embedder's output table -> PhotoResults."""
    return _to_results(table.column("sha256").to_pylist(), table.column("reason").to_pylist(),
                       table.column("template").to_pylist(),
                       table.column("node_id").to_pylist())


def _to_results(shas: list[str], reasons: list[str], blobs: list[bytes],
                nodes: list[str] | None = None) -> list[PhotoResult]:
    out = []
    for sha, reason, blob, node in zip(shas, reasons, blobs, nodes or [""] * len(shas),
                                       strict=True):
        template = None
        if not reason:
            if len(blob) != EMBEDDING_DIM * 4:
                raise MatcherError(f"an embedder returned a {len(blob)}-byte template")
            template = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        out.append(PhotoResult(sha, reason, template, node))
    return out


# -- running the embedders ------------------------------------------------------------

def embed_inline(work: list[tuple[str, str]], config: ReindexConfig,
                 timings: dict[str, float]) -> Iterator[list[PhotoResult]]:
    """The same worker in this process, one batch at a time (no Ray, no pyarrow)."""
    started = time.perf_counter()
    worker = PhotoEmbedder(config.ort_threads, config.second_face_area_ratio,
                           config.detector, config.quality)
    timings["embedder_start"] = time.perf_counter() - started
    for i in range(0, len(work), config.batch_size):
        shas = [sha for sha, _ in work[i:i + config.batch_size]]
        reasons, blobs = worker.embed(shas, [path for _, path in work[i:i + config.batch_size]])
        yield _to_results(shas, reasons, blobs)


def _check_ray_installed() -> None:
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


def start_ray(config: ReindexConfig) -> bool:
    """Connect to ``config.ray_address`` or start a private local Ray; True if we started
    (or connected) it here and so must shut it down, False if the caller already had.

    Raises MatcherError when a ``host:port`` address does not answer.
    """
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _check_ray_installed()
    target = ray_host_port(config.ray_address) if config.ray_address else None
    if not config.ray_address or (target is not None and is_loopback(target[0])):
        # Ray wholly on this host (a private instance, or a cluster whose nodes were
        # started on 127.0.0.1): everything it sends then stays on loopback.
        _keep_ray_on_loopback()
    if target is not None:
        _check_reachable(config.ray_address, *target)
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


def embed_on_ray(work: list[tuple[str, str]], config: ReindexConfig,
                 timings: dict[str, float]) -> Iterator[list[PhotoResult]]:
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
            fn_constructor_kwargs={"ort_threads": config.ort_threads,
                                   "second_face_area_ratio": config.second_face_area_ratio,
                                   "detector": config.detector, "quality": config.quality},
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


# -- driver-side pieces ---------------------------------------------------------------

def sha256_file(path: Path) -> tuple[str | None, str]:
    """(hex digest, "") or (None, reject reason)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        return None, unreadable_file_reason(exc)
    return h.hexdigest(), ""


def hash_photos(paths: Iterable[Path], threads: int) -> dict[Path, tuple[str | None, str]]:
    """sha256 of every distinct photo; hashlib releases the GIL, so threads overlap I/O."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(unique, pool.map(sha256_file, unique)))


class OutcomeCache:
    """sha256 -> reject reason for photos refused for their content, per pipeline setting.

    Holds no image and no template; only digests and reason codes. Pruned to the current
    manifest's photos at the end of each successful run.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.key = key
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS rejected_photos ("
                           "photo_sha256 TEXT NOT NULL, outcome_key TEXT NOT NULL, "
                           "reason TEXT NOT NULL, PRIMARY KEY (photo_sha256, outcome_key))"
                           " WITHOUT ROWID")

    def get_many(self, shas: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        shas = list(shas)
        for i in range(0, len(shas), 500):
            chunk = shas[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(
                f"SELECT photo_sha256, reason FROM rejected_photos WHERE outcome_key=? "
                f"AND photo_sha256 IN ({marks})", (self.key, *chunk)))
        return found

    def put_many(self, items: list[tuple[str, str]]) -> None:
        if items:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO rejected_photos VALUES (?, ?, ?)",
                                   [(sha, self.key, reason) for sha, reason in items])
            self._conn.execute("COMMIT")

    def keep_only(self, shas: set[str]) -> None:
        self._conn.execute("BEGIN")
        stale = [(s, k) for s, k in self._conn.execute(
            "SELECT photo_sha256, outcome_key FROM rejected_photos")
            if s not in shas or k != self.key]
        self._conn.executemany("DELETE FROM rejected_photos WHERE photo_sha256=? "
                               "AND outcome_key=?", stale)
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


def template_codec() -> TemplateCodec | None:
    """The codec the service uses: AES-GCM when a template key is configured, else plain."""
    from ..gallery.codecs import Keyring, TemplateCipher

    keyring = Keyring.from_env()
    return TemplateCipher(keyring) if keyring is not None else None


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    """CSV ``row,traveller_id,reason`` sorted by row, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "traveller_id", "reason"])
        for r in sorted(rejects, key=lambda r: r.row):
            writer.writerow([r.row, r.traveller_id, r.reason])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """tqdm on a terminal; elsewhere (CI, cron) one log line per 10% instead of a bar."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self._bar = None
        self._started: float | None = None  # at the first photo: start-up is not throughput
        self._first = 0
        self._next_report = 0.1
        self._enabled = enabled and total > 0
        self._redirect = None
        if self._enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Log lines go through tqdm.write, above the bar instead of through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=total, unit="photo", desc="reindex", smoothing=0.1,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self._first = n
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and self.done >= self._next_report * self.total:
            elapsed = time.monotonic() - self._started
            rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
            if rate > 0:
                log.info("reindex: %d/%d photos (%.0f%%), %.1f photos/s, ETA %.0f s",
                         self.done, self.total, 100 * self.done / self.total, rate,
                         (self.total - self.done) / rate)
            else:  # only the first batch is back: no rate yet
                log.info("reindex: %d/%d photos (%.0f%%)", self.done, self.total,
                         100 * self.done / self.total)
            while self._next_report * self.total <= self.done:
                self._next_report += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the job --------------------------------------------------------------------------

@dataclass
class _Plan:
    """Per traveller: window, photo digests wanted, digests still being embedded."""

    valid_from: float
    valid_to: float
    rows: dict[str, Booking] = field(default_factory=dict)  # sha256 -> first row with it
    pending: set[str] = field(default_factory=set)
    new: dict[str, np.ndarray] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)


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
    work: dict[str, str] = {}
    for traveller_id, plan in plans.items():
        have = stored.get(traveller_id)
        for sha, b in plan.rows.items():
            if have is not None and sha in have.photo_sha256s:
                plan.kept.add(sha)
                summary.skipped += 1
            elif sha in remembered:
                rejects.append(Reject(b.row, traveller_id, remembered[sha]))
                summary.remembered_rejects += 1
            else:
                plan.pending.add(sha)
                work.setdefault(sha, str(b.photo))
    return plans, work


def iter_nothing() -> Iterator[list[PhotoResult]]:
    """No photos to embed: no embedder (and no Ray) is started at all."""
    yield from ()


def _embed_and_enrol(batches: Iterable[list[PhotoResult]], waiting: dict[str, list[str]],
                     plans: dict[str, _Plan], writer: _Writer, cache: OutcomeCache,
                     rejects: list[Reject], progress: Progress,
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
                    if result.template is not None:
                        plan.new[result.sha256] = result.template
                    else:
                        rejects.append(Reject(plan.rows[result.sha256].row, traveller_id,
                                              result.reason))
                    if not plan.pending:
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


def run_reindex(config: ReindexConfig,
                embed: Callable[..., Iterator[list[PhotoResult]]] | None = None) -> Summary:
    """Run the whole job; returns its Summary (also written to the data dir).

    ``embed`` defaults to ``embed_on_ray`` (or ``embed_inline`` when ``use_ray`` is off).
    Raises only for a job that cannot run at all (unreadable manifest, store of another
    model); bad rows become rejects.
    """
    t0 = time.perf_counter()
    if embed is None:
        embed = embed_on_ray if config.use_ray else embed_inline
        if config.use_ray:
            _check_ray_installed()  # before anything is written, not halfway through
    summary = Summary()
    now = config.now if config.now is not None else time.time()
    manifest: Manifest = load_manifest(config.manifest, now)
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with JobLock(data_dir):
        return _run_locked(config, embed, manifest, data_dir, summary, t0)


def _run_locked(config: ReindexConfig, embed: Callable[..., Iterator[list[PhotoResult]]],
                manifest: Manifest, data_dir: Path, summary: Summary, t0: float) -> Summary:
    seconds = summary.seconds
    rejects_path = Path(config.rejects_path or data_dir / REJECTS_FILE)
    rejects = list(manifest.rejects)
    summary.rows, summary.duplicates = manifest.rows, manifest.duplicates
    summary.bookings, summary.expired = len(manifest.bookings), len(manifest.expired)

    t = time.perf_counter()
    digests = hash_photos((b.photo for b in manifest.bookings), config.hash_threads)
    seconds["hash"] = time.perf_counter() - t

    model_id, codec = default_pack().model_id, template_codec()
    # Writes go to the Store, not through a Gallery: a Gallery would also hold every new
    # template in its in-memory index, which a night of millions cannot afford. The index
    # is built once, from the store, at the end.
    store = Store.open(data_dir / STORE_FILE, model_id, codec)
    cache = OutcomeCache(data_dir / OUTCOMES_FILE, config.outcome_key)
    try:
        stored = {t.traveller_id: t for t in store.list_travellers()}
        plans, work = _plan(manifest.bookings, digests, stored, cache, summary, rejects)
        waiting: dict[str, list[str]] = defaultdict(list)
        writer = _Writer(store, stored, summary, config.store_batch_travellers,
                         config.store_batch_ms)
        for traveller_id, plan in plans.items():
            for sha in plan.pending:
                waiting[sha].append(traveller_id)
            if not plan.pending:
                writer.finish(traveller_id, plan)

        t = time.perf_counter()
        progress = Progress(len(work), config.progress)
        by_node: Counter[str] = Counter()
        # closing(): an error while writing must stop the embedders (and our Ray) now.
        with progress, closing(embed(list(work.items()), config, seconds) if work
                               else iter_nothing()) as batches:
            steady = _embed_and_enrol(batches, waiting, plans, writer, cache, rejects,
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
    verified = publish_snapshot(data_dir, model_id, codec)
    seconds["index_and_publish"] = time.perf_counter() - t
    summary.gallery_travellers = verified.travellers
    summary.gallery_templates = verified.templates
    summary.gallery_version = verified.gallery_version
    summary.snapshot = str(verified.path)

    summary.rejected = len(rejects)
    summary.rejects_by_reason = dict(Counter(r.code for r in rejects))
    write_rejects(rejects_path, rejects)
    summary.rejects_file = str(rejects_path)
    seconds["total"] = time.perf_counter() - t0
    _write_summary(data_dir / SUMMARY_FILE, summary)
    log.info("reindex done: %d embedded, %d skipped, %d rejected, %d removed; snapshot %s",
             summary.embedded, summary.skipped, summary.rejected, summary.removed,
             Path(summary.snapshot).name)
    return summary


class JobLock:
    """One re-index per data dir at a time: a cron job that overlaps a slow night fails
    at once with a clear message instead of racing the other run's removals."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file = None

    def __enter__(self) -> "JobLock":
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


def publish_snapshot(data_dir: Path, model_id: str, codec: TemplateCodec | None
                     ) -> SnapshotManifest:
    """Build the index from the store (bookings already over are left out), write the
    snapshot atomically where ``matcher serve`` watches, and verify it from disk."""
    with Gallery.open(data_dir, model_id, GalleryConfig(auto_rebuild=False), codec=codec,
                      use_snapshots=False) as gallery:
        path = gallery.export_snapshot()
        return verify_snapshot(path, gallery.model_id, gallery.store.store_id)


def _write_summary(path: Path, summary: Summary) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary.as_dict(), indent=2, sort_keys=True))
    os.replace(tmp, path)
