"""Gallery snapshots on disk: written whole or not at all, verified before they are used.

A snapshot is a folder ``gallery-v<version>-<ns>`` holding the built FAISS index, its
position -> traveller map, the traveller table and ``manifest.json`` (counts, model_id,
store_id, gallery_version, index kind and parameters, sha256 of every file). It is written
into a temporary folder, every file and the folder are fsynced, then it is renamed into
place, so a crash leaves either the old set of snapshots or the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from ..durable import file_sha256, fsync_path
from ..errors import GalleryError, SnapshotError
from .index import BuiltIndex, IndexConfig, SearchIndex

log = logging.getLogger(__name__)

FORMAT = 2  # 2: one fused template per traveller, and its photo count
MANIFEST = "manifest.json"
PREFIX = "gallery-v"
SNAPSHOTS_KEPT = 3  # the newest this many stay; older ones are pruned
# ... once a newer snapshot has existed this long: longer than any replica takes to load one
PRUNE_AFTER_S = 600.0
# The traveller table beside the index's own files: ids, booking windows, and the booking
# photos fused into each traveller's template (format 2).
TABLE_FILES = ("travellers.txt", "windows.npy", "photos.npy")


@dataclass(frozen=True)
class SnapshotManifest:
    path: Path
    gallery_version: int
    model_id: str
    store_id: str
    index_kind: str
    index_params: dict
    travellers: int
    template_count: int  # "templates" in the manifest file
    created_at: float
    files: dict[str, dict]


def write_snapshot(root: str | Path, index: SearchIndex, model_id: str, store_id: str) -> Path:
    """Write the built part of ``index`` (state at ``index.built_version``) under ``root``.

    Changes after that version are not in the snapshot; loading replays them from the store.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    built = index.built
    ids, valid_from, valid_to = index.built_table()
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        names = built.write_files(tmp)
        # Traveller ids are printable (checked at enrolment), so one per line is unambiguous.
        (tmp / "travellers.txt").write_text("\n".join(ids), encoding="utf-8")
        np.save(tmp / "windows.npy", np.stack([valid_from, valid_to]))
        np.save(tmp / "photos.npy", index.built_photos())
        names += TABLE_FILES
        for name in names:
            fsync_path(tmp / name)
        manifest = {
            "format": FORMAT,
            "gallery_version": index.built_version,
            "model_id": model_id,
            "store_id": store_id,
            "index_kind": built.kind,
            "index_params": built.params,
            "travellers": len(ids),
            "templates": built.ntotal,
            "created_at": time.time(),
            "files": {n: {"sha256": file_sha256(tmp / n), "bytes": (tmp / n).stat().st_size}
                      for n in names},
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        final = root / f"{PREFIX}{index.built_version:012d}-{time.time_ns()}"
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote snapshot %s (gallery_version %d, %d templates, %s)", final.name,
             index.built_version, built.ntotal, built.kind)
    return final


def list_snapshots(root: str | Path) -> list[Path]:
    """Snapshot folders under ``root``, newest (highest version, then latest) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(PREFIX)):
            continue
        try:
            version, ns = p.name[len(PREFIX):].split("-")
            found.append(((int(version), int(ns)), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def verify_snapshot(path: str | Path, model_id: str | None = None,
                    store_id: str | None = None) -> SnapshotManifest:
    """Check the manifest, every file's sha256, and (if given) model and store identity.

    Raises SnapshotError with a message saying what is wrong.
    """
    path = Path(path)
    try:
        raw = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        m = SnapshotManifest(path, int(raw["gallery_version"]), str(raw["model_id"]),
                     str(raw["store_id"]), str(raw["index_kind"]), dict(raw["index_params"]),
                     int(raw["travellers"]), int(raw["templates"]), float(raw["created_at"]),
                     dict(raw["files"]))
        fmt = raw["format"]
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path.name} has no {MANIFEST}; it is incomplete") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"snapshot {path.name} has an unreadable manifest ({e})") from None
    if fmt != FORMAT:
        raise SnapshotError(f"snapshot {path.name} has format {fmt}, this build reads {FORMAT}")
    if model_id is not None and m.model_id != model_id:
        raise SnapshotError(f"snapshot {path.name} was made for model {m.model_id}, "
                            f"the service runs {model_id}")
    if store_id is not None and m.store_id != store_id:
        raise SnapshotError(f"snapshot {path.name} was made from another gallery store "
                            f"({m.store_id[:8]}, this one is {store_id[:8]})")
    required = {"positions.npy", *TABLE_FILES}
    if not required <= set(m.files):
        missing = sorted(required - set(m.files))
        raise SnapshotError(f"snapshot {path.name} manifest lacks {missing}")
    for name, info in m.files.items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise SnapshotError(f"snapshot {path.name} is missing file {name}")
        if f.stat().st_size != info.get("bytes") or file_sha256(f) != info.get("sha256"):
            raise SnapshotError(f"snapshot {path.name}: file {name} does not match its "
                                f"checksum; the snapshot is corrupt")
    return m


def read_snapshot(path: str | Path, model_id: str, store_id: str | None,
                  config: IndexConfig, store_version: int | None = None
                  ) -> tuple[SnapshotManifest, SearchIndex]:
    """Verify, then load the snapshot as a SearchIndex at its gallery_version.

    ``store_version``: the store's gallery_version; a snapshot newer than its store (a store
    restored from an older backup) is refused, since removals it lacks could not be replayed.
    """
    m = verify_snapshot(path, model_id, store_id)
    path = Path(path)
    if store_version is not None and m.gallery_version > store_version:
        raise SnapshotError(f"snapshot {path.name} is at gallery_version {m.gallery_version}, "
                            f"newer than the store ({store_version}); was the store restored "
                            f"from an older backup?")
    try:
        built = BuiltIndex.read_files(path, m.index_kind, m.index_params)
        text = (path / "travellers.txt").read_text(encoding="utf-8")
        ids = text.split("\n") if text else []
        windows = np.load(path / "windows.npy")
        photos = np.load(path / "photos.npy")
    except (GalleryError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise SnapshotError(f"snapshot {path.name} cannot be loaded: {e}") from None
    if (len(ids) != m.travellers or windows.shape != (2, m.travellers)
            or photos.shape != (m.travellers,)
            or built.ntotal != m.template_count
            or (len(built.owner) and int(built.owner.max()) >= len(ids))):
        raise SnapshotError(f"snapshot {path.name} contents disagree with its manifest")
    index = SearchIndex(built, ids, windows[0], windows[1], m.gallery_version, config, photos)
    log.info("loaded snapshot %s (gallery_version %d, %d templates, %s)", path.name,
             m.gallery_version, m.template_count, m.index_kind)
    return m, index


def snapshot_version(path: Path) -> int:
    """The gallery_version a snapshot holds (from its folder name)."""
    return int(path.name[len(PREFIX):].split("-")[0])


def snapshot_written_at(path: Path) -> float:
    """When a snapshot was renamed into place (epoch seconds, from its folder name)."""
    return int(path.name.rsplit("-", 1)[1]) / 1e9


def prune_snapshots(root: str | Path, keep: int, superseded_for_s: float = 0.0,
                    now: float | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest snapshots (and stale temp folders); returns them.

    A snapshot beyond ``keep`` stays until the next newer one has existed for
    ``superseded_for_s`` seconds: a replica starts loading a snapshot only while it is the
    newest, so one that a replica may still be reading is never taken from under it.
    """
    root = Path(root)
    now = time.time() if now is None else now
    snapshots = list_snapshots(root)
    keep = max(keep, 1)
    removed = [old for newer, old in pairwise(snapshots[keep - 1:])
               if now - snapshot_written_at(newer) >= superseded_for_s]
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(".tmp-")
                    and now - p.stat().st_mtime > 3600]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
