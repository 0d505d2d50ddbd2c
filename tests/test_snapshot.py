"""Snapshots: atomic write, verification, refusal of corrupt or foreign ones, replay, hot swap."""
from __future__ import annotations

import json
import threading
from itertools import pairwise

import numpy as np
import pytest
from synthetic import MODEL, NOW, WINDOW, sha, unit

from matcher.errors import SnapshotError
from matcher.gallery.index import IndexConfig
from matcher.gallery.primary import GalleryConfig, PrimaryGallery
from matcher.gallery.snapshot import (
    list_snapshots,
    prune_snapshots,
    snapshot_written_at,
    verify_snapshot,
)


def filled(path, n=200, kind="flat", seed=0, sq8=False):
    rng = np.random.default_rng(seed)
    g = PrimaryGallery.open(path, MODEL, GalleryConfig(IndexConfig(index_kind=kind, sq8=sq8)))
    centres = unit(rng.standard_normal((n, 512)))
    for i in range(n):
        g.enroll(f"T{i}", unit(centres[i] + 0.05 * rng.standard_normal(512)), *WINDOW, [sha(i)])
    g.rebuild(now=NOW)
    return g, centres


def top1(g, probes):
    return [c[0].traveller_id if c else None for c in g.search(probes, 1, NOW)]


@pytest.mark.parametrize("kind,sq8", [("flat", False), ("binary", False), ("hnsw", False),
                                      ("hnsw", True), ("ivf", True)])
def test_roundtrip_then_replay_of_later_changes(tmp_path, kind, sq8):
    g, centres = filled(tmp_path / "g", kind=kind, sq8=sq8)
    path = g.export_snapshot()
    m = verify_snapshot(path, MODEL, g.store.store_id)
    assert (m.gallery_version, m.template_count, m.travellers, m.index_kind) == (
        200, 200, 200, kind)
    assert not any(p.name.startswith(".tmp") for p in path.parent.iterdir())
    # changes after the snapshot live only in the store; reopening must replay them
    g.remove("T3")
    g.enroll("LATE", centres[7:8], *WINDOW, [sha("late")])
    g.remove("T7")
    g.close()
    with PrimaryGallery.open(tmp_path / "g", MODEL) as again:
        assert again.index_kind == kind and again.version == 203
        got = top1(again, centres[:10])
        assert got[3] != "T3" and got[7] == "LATE"
        assert [got[i] for i in (0, 1, 2, 4, 5, 6, 8, 9)] == [f"T{i}" for i in
                                                               (0, 1, 2, 4, 5, 6, 8, 9)]


def test_corrupt_newest_snapshot_is_skipped_for_the_last_good_one(tmp_path, caplog):
    g, centres = filled(tmp_path / "g", n=50)
    good = g.export_snapshot()
    g.enroll("NEW", unit(np.ones((1, 512))), *WINDOW, [sha("new")])
    g.rebuild(now=NOW)
    bad = g.export_snapshot()
    assert list_snapshots(tmp_path / "g" / "snapshots") == [bad, good]
    g.close()
    with open(bad / "index.faiss", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe\xfd")
    with pytest.raises(SnapshotError, match="checksum"):
        verify_snapshot(bad)
    with PrimaryGallery.open(tmp_path / "g", MODEL) as again:
        # opened from `good`, then replayed the change made after it
        assert again.stats()["index_built_version"] == 50
        assert top1(again, unit(np.ones((1, 512)))) == ["NEW"]
    assert "index.faiss does not match its checksum" in caplog.text


def test_foreign_and_incomplete_snapshots_are_refused(tmp_path):
    g, _ = filled(tmp_path / "g", n=20)
    path = g.export_snapshot()
    with pytest.raises(SnapshotError, match="made for model"):
        verify_snapshot(path, model_id="other@1")
    with pytest.raises(SnapshotError, match="another gallery store"):
        verify_snapshot(path, MODEL, store_id="0" * 32)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["templates"] = 21
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="disagree"):
        g.load_snapshot(path)
    (path / "windows.npy").unlink()
    with pytest.raises(SnapshotError, match="missing file windows.npy"):
        verify_snapshot(path)
    (path / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match="incomplete"):
        verify_snapshot(path)
    g.close()


def test_a_snapshot_without_its_photo_counts_fails_verification(tmp_path):
    """photos.npy is what read_snapshot needs since format 2: a manifest that does not list
    it fails verify_snapshot (matcher gallery verify-snapshot), not only a later load."""
    g, _ = filled(tmp_path / "g", n=5)
    path = g.export_snapshot()
    g.close()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["photos.npy"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "photos.npy").unlink()
    with pytest.raises(SnapshotError, match="lacks.*photos.npy"):
        verify_snapshot(path)


def test_failed_hot_swap_keeps_serving_and_good_swap_never_fails_a_search(tmp_path):
    g, centres = filled(tmp_path / "g", n=300, kind="flat")
    other, _ = filled(tmp_path / "other", n=10)
    foreign = other.export_snapshot()
    other.close()
    with pytest.raises(SnapshotError):
        g.load_snapshot(foreign)
    assert top1(g, centres[:3]) == ["T0", "T1", "T2"]

    g2 = PrimaryGallery.open(tmp_path / "g", MODEL, GalleryConfig(IndexConfig(index_kind="hnsw")),
                      use_snapshots=False)
    g2.rebuild(now=NOW)
    hnsw_snapshot = g2.export_snapshot()
    g2.close()
    errors: list[BaseException] = []
    wrong: list[str] = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                got = top1(g, centres[:32])
                wrong.extend(x for i, x in enumerate(got) if x != f"T{i}")
            except BaseException as e:  # noqa: BLE001 - the test reports any failure
                errors.append(e)
                return

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(3):
        g.load_snapshot(hnsw_snapshot)
        g.rebuild(now=NOW)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and not wrong
    g.close()


def test_snapshot_newer_than_its_store_is_refused(tmp_path):
    import shutil

    g, _ = filled(tmp_path / "g", n=20)
    g.close()
    shutil.copy(tmp_path / "g" / "gallery.sqlite3", tmp_path / "backup.sqlite3")  # at v20
    g = PrimaryGallery.open(tmp_path / "g", MODEL)
    g.remove("T0")
    g.rebuild(now=NOW)
    newer = g.export_snapshot()
    g.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / "g" / f"gallery.sqlite3{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite3", tmp_path / "g" / "gallery.sqlite3")
    with pytest.raises(SnapshotError, match="newer than the store"):
        from matcher.gallery.snapshot import read_snapshot
        from matcher.gallery.store import Store

        with Store.open(tmp_path / "g" / "gallery.sqlite3", MODEL) as store:
            read_snapshot(newer, MODEL, store.store_id, IndexConfig(), store.gallery_version)
    with PrimaryGallery.open(tmp_path / "g", MODEL) as restored:  # falls back to a store build
        assert restored.version == 20
        assert restored.search(restored.get("T0").templates, 1, NOW)[0][0].traveller_id == "T0"


def test_pruning_never_takes_a_snapshot_a_replica_may_still_be_loading(tmp_path):
    """Beyond the kept ones, a snapshot goes only once its successor has existed for the
    prune delay: a replica starts loading a snapshot only while it is the newest."""
    g, centres = filled(tmp_path / "g", n=20)
    g.config = GalleryConfig(snapshots_kept=2, snapshot_prune_after_s=600.0)
    folder = tmp_path / "g" / "snapshots"
    written = []
    for i in range(5):  # five publishes in quick succession (interval, job, operator)
        g.enroll(f"N{i}", centres[i:i + 1], *WINDOW, [sha(f"n{i}")])
        g.rebuild(now=NOW)
        written.append(g.export_snapshot())
    assert list_snapshots(folder) == written[::-1]  # all superseded moments ago: all kept
    successor_at = {old: snapshot_written_at(new) for old, new in pairwise(written)}
    # Ten minutes after the third was written: the first two were superseded long enough.
    later = snapshot_written_at(written[2]) + 600.0
    removed = prune_snapshots(folder, 2, 600.0, now=later)
    assert sorted(removed) == sorted(written[:2])
    assert all(later - successor_at[old] >= 600.0 for old in removed)
    assert list_snapshots(folder) == written[:1:-1]
    # Far later, only the kept two remain; each one left verifies.
    prune_snapshots(folder, 2, 600.0, now=later + 3600)
    assert list_snapshots(folder) == written[:2:-1]
    assert [verify_snapshot(p, MODEL).gallery_version for p in list_snapshots(folder)] == [
        25, 24]


def _writer_and_replica(path):
    from matcher.gallery.replica import ReplicaGallery

    g, centres = filled(path, n=20)
    two = unit(centres[3] + 0.05 * np.random.default_rng(7).standard_normal((2, 512)))
    g.enroll("TWO", two, *WINDOW, [sha(100), sha(101)])
    g.rebuild(now=NOW)
    g.export_snapshot()
    return g, ReplicaGallery.open(g.snapshot_dir, MODEL), centres


def test_a_replica_counts_the_templates_the_writer_stores(tmp_path):
    """A traveller booked with two photos has two stored templates on the writer and on a
    replica of its snapshot, which holds only their fused template."""
    g, replica, _ = _writer_and_replica(tmp_path / "g")
    for tid, stored in (("TWO", 2), ("T5", 1)):
        assert g.get(tid).template_count == replica.get(tid).template_count == stored
    g.close()


def test_a_replica_refuses_the_search_the_writer_refuses(tmp_path):
    from matcher.errors import InvalidInput

    g, replica, centres = _writer_and_replica(tmp_path / "g")
    for k in (0, -1, 2.0):
        for gallery in (g, replica):
            with pytest.raises(InvalidInput, match="k must be a positive integer"):
                gallery.search(centres[:1], k, NOW)
    assert replica.search(centres[:1], 1, NOW)[0][0].traveller_id == "T0"
    g.close()
