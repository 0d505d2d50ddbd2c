"""Read replicas and hot swaps: serve from published snapshots, pick up new ones.

One writer owns the SQLite store and publishes snapshots (``PrimaryGallery.export_snapshot``).
A ``ReplicaGallery`` serves searches and 1:1 checks from the newest snapshot in a folder
(the writer's ``snapshots/`` on a shared or synced disk) and refuses writes. A
``SnapshotWatcher`` notices a newer snapshot and swaps it in: the new index is loaded and
verified in the watcher's thread while requests keep using the old one, then one reference
is replaced. A request holds the state it started with, so it finishes on the old gallery.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GalleryError, SnapshotError, UnknownTraveller
from ..templates import EMBEDDING_DIM, check_traveller_id
from .index import IndexConfig, SearchIndex, SearchResult
from .served import ClaimScore, check_claim_probe, check_search, epoch_now, score_claim
from .snapshot import SnapshotManifest, list_snapshots, read_snapshot
from .store import EnrolResult, Traveller

log = logging.getLogger(__name__)


class ReadOnlyReplica(GalleryError):
    """A write was sent to a read replica."""


@dataclass(frozen=True)
class _State:
    manifest: SnapshotManifest
    index: SearchIndex
    rows: dict[str, np.ndarray]           # traveller_id -> positions in index.built.vectors
    windows: dict[str, tuple[float, float]]


def _state(manifest: SnapshotManifest, index: SearchIndex) -> _State:
    ids, valid_from, valid_to = index.built_table()
    owner = index.built.owner
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(ids) + 1))
    rows = {tid: order[bounds[i]:bounds[i + 1]] for i, tid in enumerate(ids)}
    windows = {tid: (float(valid_from[i]), float(valid_to[i])) for i, tid in enumerate(ids)}
    return _State(manifest, index, rows, windows)


class ReplicaGallery:
    """The read side of a PrimaryGallery, from snapshots only. Thread-safe; writes raise."""

    def __init__(self, model_id: str, manifest: SnapshotManifest, index: SearchIndex,
                 config: IndexConfig) -> None:
        self.model_id = model_id
        self.config = config
        self._state = _state(manifest, index)
        self._store_id = manifest.store_id

    @classmethod
    def open(cls, snapshot_dir: str | Path, model_id: str,
             config: IndexConfig | None = None) -> ReplicaGallery:
        """Load the newest snapshot that verifies; SnapshotError if there is none."""
        config = config or IndexConfig()
        for path in list_snapshots(snapshot_dir):
            try:
                manifest, index = read_snapshot(path, model_id, None, config)
            except SnapshotError as exc:
                log.error("replica skipping snapshot: %s", exc)
                continue
            return cls(model_id, manifest, index, config)
        raise SnapshotError(f"no usable snapshot in {snapshot_dir} yet")

    # -- facts ----------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._state.manifest.gallery_version

    @property
    def size(self) -> int:
        return self._state.index.travellers

    @property
    def template_count(self) -> int:
        """Intact templates the writer stored for the travellers of ``size`` (from the
        snapshot's photo counts; the replica holds only their fused templates)."""
        return self._state.index.stored_templates

    @property
    def index_entries(self) -> int:
        """Vectors the index holds: travellers, plus removed ones not yet rebuilt away."""
        return self._state.index.entries

    def searchable(self, now=None) -> int:
        """Travellers whose booking window is open at ``now``: who a search can match."""
        return self._state.index.searchable(epoch_now(now))

    @property
    def index_kind(self) -> str:
        return self._state.index.kind

    @property
    def snapshot_name(self) -> str:
        return self._state.manifest.path.name

    @property
    def snapshot_created_at(self) -> float:
        return self._state.manifest.created_at

    # -- reads ----------------------------------------------------------------------

    def search(self, probes: np.ndarray, k: int = 5, now=None) -> SearchResult:
        x, k = check_search(probes, k)
        return self._state.index.search(x, k, epoch_now(now))

    def score_traveller(self, traveller_id: str, probe: np.ndarray, now=None) -> ClaimScore:
        x = check_claim_probe(probe)
        state = self._state
        rows = state.rows.get(check_traveller_id(traveller_id))
        if rows is None:
            raise UnknownTraveller(f"traveller {traveller_id!r} is not in the gallery")
        valid_from, valid_to = state.windows[traveller_id]
        return score_claim(traveller_id, state.index.built.vectors[rows], x, valid_from,
                           valid_to, now, state.manifest.gallery_version,
                           state.index.photos(traveller_id))

    def get(self, traveller_id: str) -> Traveller:
        state = self._state
        rows = state.rows.get(check_traveller_id(traveller_id))
        if rows is None:
            raise UnknownTraveller(f"traveller {traveller_id!r} is not in the gallery")
        valid_from, valid_to = state.windows[traveller_id]
        built = state.index.built
        templates = (built.vectors[rows] if len(rows)
                     else np.empty((0, EMBEDDING_DIM), np.float32))
        # Photo hashes live only in the writer's store; the snapshot keeps how many photos
        # (stored templates) each fused template was made of.
        return Traveller(traveller_id, valid_from, valid_to, 0.0, 0.0, templates,
                         tuple(int(t) for t in built.template_ids[rows]), (), self.model_id,
                         state.index.photos(traveller_id))

    # -- writes are the writer's ----------------------------------------------------

    def enroll(self, *args, **kwargs) -> EnrolResult:
        raise ReadOnlyReplica("this server is a read replica; enrol on the writer")

    def remove(self, *args, **kwargs) -> int:
        raise ReadOnlyReplica("this server is a read replica; remove on the writer")

    def close(self) -> None:
        """Nothing to release: a replica holds only its in-memory snapshot."""

    # -- swaps ----------------------------------------------------------------------

    def load_snapshot(self, path: str | Path) -> SnapshotManifest:
        """Verify and load ``path``, then swap it in; SnapshotError keeps the old one."""
        manifest, index = read_snapshot(path, self.model_id, self._store_id, self.config)
        self._state = _state(manifest, index)
        return manifest


class SnapshotWatcher:
    """Polls a snapshot folder every ``interval_s`` and hot-swaps newer snapshots in.

    ``gallery`` is anything with ``load_snapshot(path) -> SnapshotManifest`` (PrimaryGallery on the
    writer, ReplicaGallery on a replica). A snapshot that fails verification is logged
    once and skipped; the gallery keeps serving what it had.

    ``track_source`` (replicas): the folder is a share that can vanish (unmounted, sync
    gone, unreadable). Then the watcher keeps the snapshot it serves, logs a warning once,
    reports it through ``on_source(False)``, and picks up the newest snapshot when the
    folder is back (``on_source(True)``, logged).
    """

    def __init__(self, gallery, folder: str | Path, interval_s: float = 2.0,
                 on_swap: Callable[[SnapshotManifest], None] | None = None,
                 track_source: bool = False,
                 on_source: Callable[[bool], None] | None = None) -> None:
        self.gallery = gallery
        self.folder = Path(folder)
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.track_source = track_source
        self.on_source = on_source
        self.source_ok = True
        newest = list_snapshots(self.folder)
        self._seen: Path | None = newest[0] if newest else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, write: Callable[[], Path]) -> Path:
        """Run ``write`` (which writes a snapshot into the folder and returns its path)
        without the watcher looking, and mark its result seen: a snapshot this process
        wrote itself holds nothing new to load."""
        with self._lock:
            path = write()
            self._seen = path
        return path

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _note_source(self, reachable: bool, problem: str = "") -> None:
        if self.track_source and reachable != self.source_ok:
            if reachable:
                log.warning("snapshot folder %s is reachable again; picking up its newest "
                            "snapshot", self.folder)
            else:
                serving = getattr(self.gallery, "snapshot_name", "?")
                log.warning("snapshot folder %s is gone or unreadable (%s); still serving "
                            "snapshot %s, which grows stale until the folder returns "
                            "(metric matcher_snapshot_age_seconds)", self.folder, problem,
                            serving)
        self.source_ok = reachable
        if self.on_source is not None:
            self.on_source(reachable)

    def _list(self) -> list[Path] | None:
        """Snapshots in the folder, or None if the folder cannot be read."""
        try:
            if not self.folder.is_dir():
                self._note_source(False, "no such folder")
                return None
            snapshots = list_snapshots(self.folder)
        except OSError as exc:  # unreadable, stale NFS handle, I/O error
            self._note_source(False, exc.strerror or type(exc).__name__)
            return None
        self._note_source(True)
        return snapshots

    def check_now(self) -> SnapshotManifest | None:
        """Load the newest snapshot if it is new; returns its manifest, else None."""
        with self._lock:
            snapshots = self._list()
            if not snapshots or snapshots[0] == self._seen:
                return None
            path = snapshots[0]
            try:
                manifest = self.gallery.load_snapshot(path)
            except SnapshotError as exc:
                if not self.folder.is_dir():  # the share vanished mid-read: retry it later
                    self._note_source(False, "vanished while a snapshot was read")
                    return None
                self._seen = path
                log.error("not swapping to snapshot %s: %s", path.name, exc)
                return None
            self._seen = path
        log.info("hot-swapped to snapshot %s (gallery_version %d)", path.name,
                 manifest.gallery_version)
        if self.on_swap is not None:
            self.on_swap(manifest)
        return manifest

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_now()
            except Exception:  # the watcher must outlive one bad disk read; serving goes on
                log.exception("snapshot watcher failed to check %s", self.folder)
