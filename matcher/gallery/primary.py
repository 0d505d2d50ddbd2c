"""The gallery the service searches: durable store + in-memory index + snapshots, one facade.

Thread-safe. Writes (enrol, remove, replay, swap) are serialised by one lock and reach the
index only after the store has committed them; searches take the current index reference
once and never lock, so a rebuild or a snapshot hot swap never fails an in-flight search.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import GalleryError, SnapshotError
from ..templates import check_traveller_id, fuse_groups, fuse_templates
from .codecs import TemplateCodec
from .index import IndexConfig, SearchIndex, SearchResult
from .integrity import quarantined, verify_templates
from .layout import SNAPSHOT_DIR, STORE_FILE
from .served import ClaimScore, check_claim_probe, check_search, epoch_now, score_claim
from .snapshot import (
    PRUNE_AFTER_S,
    SNAPSHOTS_KEPT,
    SnapshotManifest,
    list_snapshots,
    prune_snapshots,
    read_snapshot,
    write_snapshot,
)
from .store import EnrolResult, Store, Traveller

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GalleryConfig:
    index: IndexConfig = field(default_factory=IndexConfig)
    snapshots_kept: int = SNAPSHOTS_KEPT
    snapshot_prune_after_s: float = PRUNE_AFTER_S  # snapshot.prune_snapshots
    # Rebuild in the background once the exact delta holds index.delta_max_templates.
    auto_rebuild: bool = True
    # PRAGMA quick_check at open, interrupted after this many seconds (0: skip). A store
    # that fails it is refused; one too big to check in time is served and logged.
    quick_check_s: float = 30.0


class PrimaryGallery:
    """The writer's gallery: the store every template is committed to first, the search
    index of one fused template per traveller built from it, and the snapshots replicas
    serve. ``ReplicaGallery`` is its read-only twin."""

    def __init__(self, data_dir: Path, store: Store, index: SearchIndex,
                 config: GalleryConfig) -> None:
        self.data_dir = data_dir
        self.store = store
        self.config = config
        self._index = index
        self._lock = threading.RLock()
        self._rebuilding: threading.Thread | None = None
        self._closed = False

    @classmethod
    def open(cls, data_dir: str | Path, model_id: str, config: GalleryConfig | None = None,
             codec: TemplateCodec | None = None, use_snapshots: bool = True) -> PrimaryGallery:
        """Open (or create) the gallery in ``data_dir``.

        Loads the newest snapshot that verifies (a corrupt or mismatched one is logged and
        skipped), or builds the index from the store, then replays newer store changes.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        config = config or GalleryConfig()
        store = Store.open(data_dir / STORE_FILE, model_id, codec,
                           quick_check_s=config.quick_check_s)
        try:
            index = None
            if use_snapshots:
                for path in list_snapshots(data_dir / SNAPSHOT_DIR):
                    try:
                        _, index = read_snapshot(path, model_id, store.store_id, config.index,
                                                 store.gallery_version)
                        break
                    except SnapshotError as e:
                        log.error("not serving from snapshot %s: %s. Check it with `matcher "
                                  "gallery verify-snapshot %s`; the next good one (or the "
                                  "store) is used, `matcher gallery export-snapshot "
                                  "--data %s` writes a fresh one", path, e, path, data_dir)
            if index is None:
                index = _build(store, config.index, time.time())  # read_all checks every row
            else:
                # The snapshot's own copy verified; the store's rows are checked here so a
                # rotted row is quarantined at start-up, and its traveller served without it.
                _drop_damaged(store, index)
            gallery = cls(data_dir, store, index, config)
            gallery.refresh()
        except BaseException:
            store.close()
            raise
        return gallery

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker = self._rebuilding
        if worker is not None:
            worker.join()
        self.store.close()

    def __enter__(self) -> PrimaryGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.store.model_id

    @property
    def version(self) -> int:
        """The gallery_version the in-memory index reflects."""
        return self._index.applied_version

    @property
    def size(self) -> int:
        """Travellers in the index (whatever their booking window)."""
        return self._index.travellers

    @property
    def template_count(self) -> int:
        """Intact templates stored for the travellers of ``size``, one per booking photo
        (the index searches one fused template per traveller)."""
        return self._index.stored_templates

    @property
    def index_entries(self) -> int:
        """Vectors the index holds: travellers, plus removed ones not yet rebuilt away."""
        return self._index.entries

    def searchable(self, now: datetime | float | None = None) -> int:
        """Travellers whose booking window is open at ``now``: who a search can match."""
        return self._index.searchable(epoch_now(now))

    @property
    def index_kind(self) -> str:
        return self._index.kind

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / SNAPSHOT_DIR

    def stats(self) -> dict[str, object]:
        travellers, templates = self.store.counts()
        damaged = quarantined(self.store)
        ix = self._index
        return {"model_id": self.model_id, "store_id": self.store.store_id,
                "schema_version": self.store.schema_version,
                "gallery_version": self.store.gallery_version,
                "index_version": ix.applied_version, "index_built_version": ix.built_version,
                "index_kind": ix.kind, "index_params": ix.built.params,
                "travellers": travellers, "templates": templates,
                "index_travellers": ix.travellers, "index_entries": ix.entries,
                "searchable_now": ix.searchable(time.time()),  # the N of a 1:N search now
                "delta_templates": ix.delta_template_count,
                "quarantined": [{"template_id": d.template_id, "traveller_id": d.traveller_id,
                                 "reason": d.reason} for d in damaged],
                "snapshots": [p.name for p in list_snapshots(self.snapshot_dir)]}

    # -- writes ---------------------------------------------------------------------

    def enroll(self, traveller_id: str, templates: np.ndarray,
               valid_from: datetime | float, valid_to: datetime | float,
               photo_sha256s: Sequence[str], wait_s: float | None = None) -> EnrolResult:
        """Store templates (k, 512) float32 L2-normalised for a traveller; returns once the
        transaction is durable and the traveller is searchable. ``wait_s`` bounds the wait
        for the store (StoreBusy after it); searches never wait for a write."""
        with self._lock:
            self._check_open()
            result = self.store.enroll(traveller_id, templates, valid_from, valid_to,
                                       photo_sha256s, wait_s=wait_s)
            if result.changed:
                self.refresh()
        self._maybe_rebuild()
        return result

    def remove(self, traveller_id: str, wait_s: float | None = None) -> int:
        """Delete a traveller; never returned by a search once this returns."""
        with self._lock:
            self._check_open()
            version = self.store.remove(traveller_id, wait_s=wait_s)
            self.refresh()
        return version

    def refresh(self) -> int:
        """Apply store changes newer than the index (ours, or another process's)."""
        with self._lock:
            _replay(self.store, self._index)
            return self._index.applied_version

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError("the gallery is closed")

    # -- reads ----------------------------------------------------------------------

    def get(self, traveller_id: str) -> Traveller:
        return self.store.get(traveller_id)

    def search(self, probes: np.ndarray, k: int = 5, now: datetime | float | None = None
               ) -> SearchResult:
        """1:N. probes (n, 512) float32 L2-normalised -> per probe up to k Candidates
        (traveller_id, best score), best first, among travellers valid at ``now``; with
        the gallery_version and searchable count of the index state searched."""
        x, k = check_search(probes, k)
        return self._index.search(x, k, epoch_now(now))

    def score_traveller(self, traveller_id: str, probe: np.ndarray,
                        now: datetime | float | None = None) -> ClaimScore:
        """1:1 against the durable store. probe (512,) float32; raises UnknownTraveller."""
        x = check_claim_probe(probe)
        t, version = self.store.get_with_version(check_traveller_id(traveller_id))
        return score_claim(t.traveller_id, t.templates, x, t.valid_from, t.valid_to, now,
                           version)

    # -- rebuild and snapshots ------------------------------------------------------

    def rebuild(self, now: datetime | float | None = None) -> None:
        """Build a fresh index from the store (dropping bookings ended by ``now``) without
        blocking searches or writes, then catch up and swap it in."""
        fresh = _build(self.store, self.config.index, epoch_now(now))
        self._swap(fresh)

    def _swap(self, fresh: SearchIndex) -> None:
        with self._lock:
            _replay(self.store, fresh)
            old, self._index = self._index, fresh
        log.info("index swapped: %s at gallery_version %d (was %s at %d)", fresh.kind,
                 fresh.applied_version, old.kind, old.applied_version)

    def _maybe_rebuild(self) -> None:
        if not (self.config.auto_rebuild and self._index.needs_rebuild):
            return
        with self._lock:
            if self._closed or (self._rebuilding is not None and self._rebuilding.is_alive()):
                return
            self._rebuilding = threading.Thread(target=self._rebuild_worker,
                                                name="gallery-rebuild", daemon=True)
            self._rebuilding.start()

    def _rebuild_worker(self) -> None:
        try:
            self.rebuild()
        except Exception:  # a failed background rebuild leaves the current index serving
            log.exception("background gallery rebuild failed; the current index stays")

    def export_snapshot(self, root: str | Path | None = None) -> Path:
        """Write the built index to ``root`` (default data_dir/snapshots) atomically.

        The snapshot holds the state at the index's build version; changes since are in
        the store and are replayed on load. Call rebuild() first for a compact snapshot.
        """
        root = Path(root) if root is not None else self.snapshot_dir
        path = write_snapshot(root, self._index, self.model_id, self.store.store_id)
        if root == self.snapshot_dir:
            prune_snapshots(root, self.config.snapshots_kept,
                            self.config.snapshot_prune_after_s)
        return path

    def load_snapshot(self, path: str | Path) -> SnapshotManifest:
        """Hot swap to a snapshot; on any problem raise SnapshotError and keep serving."""
        manifest, fresh = read_snapshot(path, self.model_id, self.store.store_id,
                                        self.config.index, self.store.gallery_version)
        self._swap(fresh)
        return manifest


def _index_traveller(index: SearchIndex, t: Traveller, version: int | None = None) -> None:
    """The index holds one template per traveller: the fused template of every intact
    booking photo (so N counts travellers), filed under the first photo's template id.
    ``version``: the gallery_version published with the change (SearchIndex.upsert)."""
    if not len(t.templates):
        index.remove(t.traveller_id, version)
        return
    index.upsert(t.traveller_id, t.valid_from, t.valid_to,
                 fuse_templates(t.templates)[None, :], [min(t.template_ids)],
                 len(t.templates), version)


def _drop_damaged(store: Store, index: SearchIndex) -> None:
    """Check every store row and take damaged ones (new or already quarantined) out of
    ``index``: their travellers are re-read with their intact templates only."""
    verify_templates(store)
    for traveller_id in dict.fromkeys(d.traveller_id for d in quarantined(store)):
        t = store.find(traveller_id)
        if t is None:
            index.remove(traveller_id)
        else:
            _index_traveller(index, t)


def _build(store: Store, config: IndexConfig, now: float) -> SearchIndex:
    rows = store.read_all(valid_after=now)
    travellers = len(rows.traveller_ids)
    fused = fuse_groups(rows.vectors, rows.owner, travellers)
    # each traveller's first template id, for the travellers that have templates
    order = np.lexsort((rows.template_ids, rows.owner))
    starts = np.flatnonzero(np.r_[True, rows.owner[order][1:] != rows.owner[order][:-1]]
                            ) if len(order) else np.empty(0, np.int64)
    owners = rows.owner[order][starts]
    return SearchIndex.build(fused[owners], owners.astype(np.int32),
                             rows.template_ids[order][starts],
                             rows.traveller_ids, rows.valid_from, rows.valid_to,
                             rows.gallery_version, config,
                             np.bincount(rows.owner, minlength=travellers))


def _replay(store: Store, index: SearchIndex) -> None:
    """Bring ``index`` up to the store: re-read every traveller changed since it was built
    or last refreshed (caller holds the gallery lock)."""
    changes = store.changes_since(index.applied_version)
    if not changes:
        return
    version = changes[-1].gallery_version
    travellers = list(dict.fromkeys(c.traveller_id for c in changes))
    for i, traveller_id in enumerate(travellers):
        # The last change is published with the version the index then reflects, so a
        # search sees the service's own enrolment or removal with its version, never
        # apart from it. (A replay of several changes shows the ones before it under the
        # version before them.)
        at = version if i == len(travellers) - 1 else None
        t = store.find(traveller_id)
        if t is None:
            index.remove(traveller_id, at)
        else:
            _index_traveller(index, t, at)
    index.applied_version = version  # a removal of someone the index never held
