"""The overnight re-index, run for real: the shared photos plus broken rows, on local Ray.

The first two runs go through the ``matcher reindex`` command in a subprocess (a private
local Ray instance, started and stopped by the command); the later ones run the same job
in-process without Ray, which is enough to check what they test (removals, resumption).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image, ImageFilter
from service_helpers import ServerThread, server_config

from matcher.client import MatcherClient
from matcher.face.models import ModelPack, default_pack
from matcher.gallery.primary import SNAPSHOT_DIR, STORE_FILE, PrimaryGallery
from matcher.gallery.snapshot import list_snapshots, verify_snapshot
from matcher.reindex.cache import OUTCOMES_FILE
from matcher.reindex.embedding import PhotoEmbedder, embed_inline, unpack_faces
from matcher.reindex.job import ReindexConfig, run_reindex
from matcher.reindex.report import SUMMARY_FILE
from matcher.v1 import matcher_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
DAY = 86_400.0

# traveller -> booking photo(s); every one of these must be enrolled.
GOOD = {
    "KZ-OBAMA": ["obama_1.jpg", "obama_4.jpg"],
    "KZ-BIDEN": ["biden_1.jpg"],
    "KZ-KIT": ["kit_harington_1.jpg"],
    "KZ-ROSE": ["rose_leslie_1.jpg"],
    "KZ-ALEX": ["alex_lacamoire_1.jpg"],
    "KZ-LIN": ["lin_manuel_miranda_1.png"],
}
# Probes never enrolled -> who they are.
PROBES = {
    "obama_2.jpg": "KZ-OBAMA", "obama_exif_rotated.jpg": "KZ-OBAMA",
    "obama_small.jpg": "KZ-OBAMA", "biden_2.jpg": "KZ-BIDEN",
    "kit_harington_2.jpg": "KZ-KIT", "kit_harington_3.jpg": "KZ-KIT",
    "rose_leslie_2.jpg": "KZ-ROSE", "alex_lacamoire_2.jpg": "KZ-ALEX",
}


@dataclass
class Night:
    root: Path
    manifest: Path
    data_dir: Path
    expected_rejects: list[tuple[str, str, str]]  # (row, traveller_id, reason)
    window: tuple[float, float]
    summary: dict
    run_seconds: float


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _bad_photos(faces_dir: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir()
    rng = np.random.default_rng(5)
    out = {"random": folder / "random.jpg", "truncated": folder / "truncated.jpg",
           "no_face": folder / "no_face.jpg", "blurred": folder / "blurred.jpg"}
    out["random"].write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    whole = (faces_dir / "obama_1.jpg").read_bytes()
    out["truncated"].write_bytes(whole[: len(whole) // 2])
    # A real photograph with no face in it: the lower part of obama_3.jpg (his suit).
    with Image.open(faces_dir / "obama_3.jpg") as im:
        im.crop((0, 1200, im.width, im.height)).convert("RGB").save(out["no_face"], "JPEG")
    with Image.open(faces_dir / "obama_1.jpg") as im:
        im.convert("RGB").filter(ImageFilter.GaussianBlur(8)).save(out["blurred"], "JPEG")
    return out


def _write_manifest(path: Path, rows: list[list[str]]) -> Path:
    # surrogateescape: file names that are not valid UTF-8 are written as their bytes.
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["traveller_id", "photo", "valid_from", "valid_to"])
        w.writerows(rows)
    return path


def _good_rows(faces_dir: Path, window: tuple[float, float],
               photos: dict[str, list[str]] = GOOD) -> list[list[str]]:
    vf, vt = _iso(window[0]), _iso(window[1])
    rows = []
    for tid, files in photos.items():
        for i, name in enumerate(files):
            # Exercise both ways of naming a photo: a path and a file:// URI.
            photo = (faces_dir / name).resolve()
            rows.append([tid, photo.as_uri() if i else str(photo), vf, vt])
    return rows


def _reindex_cli(manifest: Path, data_dir: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "matcher.cli", "reindex", "--manifest", str(manifest),
         "--data", str(data_dir), "--num-cpus", "2", "--actors", "2",
         "--memory-per-actor-mb", "256", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((data_dir / SUMMARY_FILE).read_text()), seconds


def _rejects(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as f:
        return [(r["row"], r["traveller_id"], r["reason"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def night(tmp_path_factory, faces_dir: Path) -> Night:
    root = tmp_path_factory.mktemp("night")
    now = time.time()
    window = (now - DAY, now + 2 * DAY)
    vf, vt = _iso(window[0]), _iso(window[1])
    bad = _bad_photos(faces_dir, root / "bad")
    rows = _good_rows(faces_dir, window)
    # KZ-LIN's photo under a file name that is not valid UTF-8 (Latin-1 from an old system).
    odd = root / os.fsdecode(b"lin-manuel-miranda-\xe9.png")
    shutil.copyfile(faces_dir / GOOD["KZ-LIN"][0], odd)
    rows = [[r[0], str(odd), r[2], r[3]] if r[0] == "KZ-LIN" else r for r in rows]
    n = len(rows)
    rows += [
        ["KZ-GONE", str(root / "bad" / "not_there.jpg"), vf, vt],
        ["KZ-RANDOM", str(bad["random"]), vf, vt],
        ["KZ-TRUNC", str(bad["truncated"]), vf, vt],
        ["KZ-NOFACE", str(bad["no_face"]), vf, vt],
        ["KZ-GROUP", str(faces_dir / "group_two_people.jpg"), vf, vt],
        ["KZ-BLUR", str(bad["blurred"]), vf, vt],
        ["KZ-TWICE", str(faces_dir / "obama_2.jpg"), vf, vt],
        ["KZ-TWICE", str(faces_dir / "obama_3.jpg"), vf, _iso(window[1] + DAY)],
        ["KZ-BADDATE", str(faces_dir / "biden_2.jpg"), vf, "next tuesday"],
        ["KZ-OLD", str(faces_dir / "obama_4.jpg"), "2020-01-01", "2020-01-02"],
    ]
    expected = [(str(n + 1), "KZ-GONE", "missing_file"),
                (str(n + 2), "KZ-RANDOM", "unreadable_image:unsupported"),
                (str(n + 3), "KZ-TRUNC", "unreadable_image:corrupt"),
                (str(n + 4), "KZ-NOFACE", "no_face"),
                (str(n + 5), "KZ-GROUP", "multiple_faces"),
                (str(n + 6), "KZ-BLUR", "low_quality:blurred"),
                (str(n + 7), "KZ-TWICE", "conflicting_booking"),
                (str(n + 8), "KZ-TWICE", "conflicting_booking"),
                (str(n + 9), "KZ-BADDATE", "invalid_row:valid_to")]
    manifest = _write_manifest(root / "bookings.csv", rows)
    data_dir = root / "data"
    summary, seconds = _reindex_cli(manifest, data_dir)
    return Night(root, manifest, data_dir, expected, window, summary, seconds)


@pytest.mark.slow
def test_the_night_job_enrols_good_rows_and_rejects_each_bad_one(night: Night,
                                                                   faces_dir: Path) -> None:
    s = night.summary
    n_good = sum(len(v) for v in GOOD.values())
    assert s["rows"] == n_good + 10 and s["expired"] == 1
    assert s["embedded"] == n_good + 5  # the good photos and five unusable ones
    assert s["skipped"] == 0 and s["removed"] == 0
    assert s["enrolled"] == len(GOOD)
    assert _rejects(night.data_dir / "rejects.csv") == night.expected_rejects
    assert s["rejected"] == len(night.expected_rejects)
    assert s["rejects_by_reason"] == {"missing_file": 1, "unreadable_image": 2, "no_face": 1,
                                      "multiple_faces": 1, "low_quality": 1,
                                      "conflicting_booking": 2, "invalid_row": 1}

    snapshot = Path(s["snapshot"])
    assert list_snapshots(night.data_dir / SNAPSHOT_DIR)[0] == snapshot
    with PrimaryGallery.open(night.data_dir, default_pack().model_id) as gallery:
        m = verify_snapshot(snapshot, gallery.model_id, gallery.store.store_id)
        # the store keeps every photo's template; the snapshot one fused per traveller
        assert (m.travellers, m.template_count) == (len(GOOD), len(GOOD))
        assert gallery.store.counts() == (len(GOOD), n_good)
        assert m.gallery_version == gallery.store.gallery_version
        assert {t.traveller_id for t in gallery.store.list_travellers()} == set(GOOD)
        obama = gallery.get("KZ-OBAMA")
        assert set(obama.photo_sha256s) == {
            hashlib.sha256((faces_dir / f).read_bytes()).hexdigest() for f in GOOD["KZ-OBAMA"]}
        assert (obama.valid_from, obama.valid_to) == pytest.approx(night.window, abs=1.0)


@pytest.mark.slow
def test_a_server_started_on_the_result_identifies_the_shared_faces(
        night: Night, faces_dir: Path, pipeline, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(night.data_dir, data_dir)
    with ServerThread(server_config(data_dir), pipeline) as srv, \
            MatcherClient(srv.address) as client:
        info = client.gallery_info()
        assert info.gallery_version == night.summary["gallery_version"]
        # one fused template each in the index, every booking photo's template stored
        assert (info.travellers, info.index_entries) == (len(GOOD), len(GOOD))
        assert info.templates == sum(len(v) for v in GOOD.values())
        assert info.searchable_travellers == len(GOOD)
        for name, expected in PROBES.items():
            r = client.identify((faces_dir / name).read_bytes())
            assert (r.decision, r.traveller_id) == (pb.MATCH, expected), name
        # Every face of the group photos: the enrolled people, and no match for the third
        # face of group_obama_biden.jpg, who is booked nowhere (the service may also call
        # that face, turned away, LOW_QUALITY; either way it is not a match).
        matched, unmatched = [], 0
        for name in ("group_kit_harington_rose_leslie.jpg", "group_obama_biden.jpg"):
            r = client.identify((faces_dir / name).read_bytes(), all_faces=True)
            matched += [f.traveller_id for f in r.faces if f.decision == pb.MATCH]
            unmatched += sum(f.decision in (pb.NO_MATCH, pb.LOW_QUALITY) for f in r.faces)
        assert sorted(matched) == ["KZ-BIDEN", "KZ-KIT", "KZ-OBAMA", "KZ-ROSE"]
        assert unmatched == 1


@pytest.mark.slow
def test_a_running_server_swaps_in_the_next_night_without_a_failed_request(
        night: Night, faces_dir: Path, pipeline, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(night.data_dir, data_dir)
    kit = (faces_dir / "kit_harington_2.jpg").read_bytes()
    with ServerThread(server_config(data_dir, watch_interval_s=0.1), pipeline) as srv, \
            MatcherClient(srv.address) as client:
        assert client.identify(kit).traveller_id == "KZ-KIT"
        # Lanes keep asking while the job runs and the server swaps.
        outcomes: list[str] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def lane() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(client.identify(kit).traveller_id)
                except grpc.RpcError as exc:
                    errors.append(exc)

        lane_thread = threading.Thread(target=lane)
        lane_thread.start()
        try:
            # Tonight KZ-KIT's booking is cancelled.
            photos = {k: v for k, v in GOOD.items() if k != "KZ-KIT"}
            manifest = _write_manifest(tmp_path / "next.csv",
                                       _good_rows(faces_dir, night.window, photos))
            s = run_reindex(ReindexConfig(manifest, data_dir, use_ray=False, progress=False))
            assert (s.embedded, s.removed) == (0, 1)
            deadline = time.monotonic() + 20
            while (client.gallery_info().snapshot != Path(s.snapshot).name
                   and time.monotonic() < deadline):
                stop.wait(0.1)
            assert client.gallery_info().snapshot == Path(s.snapshot).name
            r = client.identify(kit)
            assert r.decision == pb.NO_MATCH and r.traveller_id == ""
        finally:
            stop.set()
            lane_thread.join(30)
    assert not errors, errors[:3]
    assert outcomes and set(outcomes) <= {"KZ-KIT", ""}


@pytest.mark.slow
def test_a_second_run_does_no_embedding_work(night: Night) -> None:
    before = list_snapshots(night.data_dir / SNAPSHOT_DIR)[0]
    summary, _ = _reindex_cli(night.manifest, night.data_dir)
    n_good = sum(len(v) for v in GOOD.values())
    assert summary["embedded"] == 0
    assert summary["skipped"] == n_good
    assert summary["remembered_rejects"] == 5
    assert summary["enrolled"] == 0 and summary["removed"] == 0
    assert summary["unchanged"] == len(GOOD)
    assert "embedder_start" not in summary["seconds"]  # Ray was not even started
    assert _rejects(night.data_dir / "rejects.csv") == night.expected_rejects
    assert summary["gallery_version"] == night.summary["gallery_version"]
    assert Path(summary["snapshot"]) != before  # still republished, same content


def _template_rows(data_dir: Path, traveller_id: str) -> int:
    with sqlite3.connect(data_dir / STORE_FILE) as conn:
        return conn.execute("SELECT COUNT(*) FROM templates WHERE traveller_id=?",
                            (traveller_id,)).fetchone()[0]


def test_cancelled_expired_moved_and_rephotographed_bookings(night: Night, faces_dir: Path,
                                                             tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(night.data_dir, data_dir)
    assert _template_rows(data_dir, "KZ-LIN") == 1
    photos = {k: v for k, v in GOOD.items() if k not in ("KZ-LIN", "KZ-ROSE", "KZ-ALEX")}
    photos["KZ-BIDEN"] = ["biden_2.jpg"]  # a new booking photo replaces the old one
    rows = _good_rows(faces_dir, night.window, photos)
    # KZ-ALEX moved his trip by a day: same photo, new window, nothing to embed.
    moved = (night.window[0] + DAY, night.window[1] + DAY)
    rows += _good_rows(faces_dir, moved, {"KZ-ALEX": GOOD["KZ-ALEX"]})
    # KZ-ROSE is still listed, but her booking has ended; KZ-LIN is cancelled (not listed).
    rows.append(["KZ-ROSE", str(faces_dir / "rose_leslie_1.jpg"),
                 _iso(night.window[0] - 3 * DAY), _iso(night.window[0] - DAY)])
    manifest = _write_manifest(tmp_path / "bookings.csv", rows)
    s = run_reindex(ReindexConfig(manifest, data_dir, use_ray=False, progress=False))
    assert (s.embedded, s.removed, s.expired, s.rejected) == (1, 2, 1, 0)
    assert (s.enrolled, s.unchanged) == (2, 2)  # KZ-BIDEN and KZ-ALEX changed
    # Deleted, not hidden: no template row is left in the store file.
    assert _template_rows(data_dir, "KZ-LIN") == 0
    assert _template_rows(data_dir, "KZ-ROSE") == 0
    new_sha = hashlib.sha256((faces_dir / "biden_2.jpg").read_bytes()).hexdigest()
    with PrimaryGallery.open(data_dir, default_pack().model_id) as gallery:
        assert gallery.get("KZ-BIDEN").photo_sha256s == (new_sha,)
        alex = gallery.get("KZ-ALEX")
        assert (alex.valid_from, alex.valid_to) == pytest.approx(moved, abs=1.0)
        assert len(alex.templates) == 1
        ids = (Path(s.snapshot) / "travellers.txt").read_text().split("\n")
        assert sorted(ids) == sorted([*photos, "KZ-ALEX"])
    # Only the photos of this manifest are still remembered as rejected (none here).
    with sqlite3.connect(data_dir / OUTCOMES_FILE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rejected_photos").fetchone()[0] == 0


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped(faces_dir: Path, tmp_path: Path) -> None:
    now = time.time()
    window = (now - DAY, now + DAY)
    photos = {k: v for k, v in GOOD.items() if k != "KZ-OBAMA"}
    manifest = _write_manifest(tmp_path / "bookings.csv", _good_rows(faces_dir, window, photos))
    config = ReindexConfig(manifest, tmp_path / "data", use_ray=False, progress=False,
                           batch_size=1)

    def dies_after_two(work, cfg, timings):
        for i, batch in enumerate(embed_inline(work, cfg, timings)):
            if i == 2:
                raise _Interrupted("power cut")
            yield batch

    with pytest.raises(_Interrupted):
        run_reindex(config, embed=dies_after_two)
    with PrimaryGallery.open(config.data_dir, default_pack().model_id, use_snapshots=False) as g:
        assert g.store.counts() == (2, 2)  # what was acknowledged is durable
    s = run_reindex(config)
    assert (s.embedded, s.skipped, s.enrolled) == (3, 2, 3)
    assert s.gallery_travellers == len(photos)


def test_photo_embedder_refuses_bad_photos_with_reasons(faces_dir: Path, tmp_path: Path
                                                        ) -> None:
    worker = PhotoEmbedder()
    good = faces_dir / "kit_harington_1.jpg"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases = [(good, "KIT"), (faces_dir / "group_obama_biden.jpg", "GROUP"),
             (empty, "EMPTY"), (tmp_path / "missing.jpg", "MISSING"), (tmp_path, "DIR")]
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "0" * 64
            for p, _ in cases]
    reasons, packed = worker.embed(shas, [str(p) for p, _ in cases])
    # a group photo is judged with the rest of its booking, on the driver
    assert reasons == ["", "", "unreadable_image:empty", "missing_file",
                       "missing_file:is_a_directory"]
    (face,), shape = unpack_faces(packed[0])
    assert face.template.shape == (512,) and abs(float(np.linalg.norm(face.template)) - 1) < 1e-4
    assert shape == Image.open(good).size[::-1] and face.quality.accepted
    group, _ = unpack_faces(packed[1])
    assert len(group) == 3 and all(0 < f.area for f in group)
    assert all(b == b"" for b in packed[2:])
    # The file no longer has the bytes the driver hashed.
    reasons, _ = worker.embed(["f" * 64], [str(good)])
    assert reasons == ["unreadable_image:changed_during_run"]


def test_a_job_that_cannot_run_fails_before_writing_anything(faces_dir: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    from matcher.errors import MatcherError
    from matcher.reindex.manifest import ManifestError

    good = _write_manifest(tmp_path / "ok.csv", _good_rows(
        faces_dir, (time.time(), time.time() + DAY), {"KZ-KIT": GOOD["KZ-KIT"]}))
    bad = tmp_path / "bad.csv"
    bad.write_text("traveller,photo\nKZ-KIT,kit.jpg\n")
    with pytest.raises(ManifestError, match="lacks column"):
        run_reindex(ReindexConfig(bad, tmp_path / "data", use_ray=False))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were missing
    with pytest.raises(MatcherError, match="--no-ray"):
        run_reindex(ReindexConfig(good, tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_two_runs_on_one_data_dir_do_not_overlap(faces_dir: Path, tmp_path: Path) -> None:
    from matcher.errors import MatcherError
    from matcher.reindex.job import JobLock

    manifest = _write_manifest(tmp_path / "ok.csv", _good_rows(
        faces_dir, (time.time(), time.time() + DAY), {"KZ-KIT": GOOD["KZ-KIT"]}))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with JobLock(data_dir):  # as if last night's run were still going
        with pytest.raises(MatcherError, match="another reindex is running"):
            run_reindex(ReindexConfig(manifest, data_dir, use_ray=False))
    assert not (data_dir / STORE_FILE).exists()
    s = run_reindex(ReindexConfig(manifest, data_dir, use_ray=False, progress=False))
    assert s.enrolled == 1


POWER_CUT = """
import os, sys
from pathlib import Path
from typing import Any
from matcher.reindex.embedding import embed_inline
from matcher.reindex.job import ReindexConfig, run_reindex

config = ReindexConfig(Path(sys.argv[1]), Path(sys.argv[2]), use_ray=False, progress=False,
                       batch_size=1, store_batch_travellers=2, store_batch_ms=1e9)

def power_cut(work, cfg, timings):
    for i, batch in enumerate(embed_inline(work, cfg, timings)):
        if i == 3:
            os._exit(3)  # no finally, no flush: the process is simply gone
        yield batch

run_reindex(config, embed=power_cut)
"""


def test_a_hard_crash_loses_only_the_uncommitted_store_batch(faces_dir: Path,
                                                            tmp_path: Path) -> None:
    """Travellers are committed two at a time here; the process dies with a third one
    complete but not committed: the first two are durable and never embedded again, the
    third is embedded again on resume."""
    now = time.time()
    photos = {k: v for k, v in GOOD.items() if k != "KZ-OBAMA"}  # one photo each
    manifest = _write_manifest(tmp_path / "bookings.csv",
                               _good_rows(faces_dir, (now - DAY, now + DAY), photos))
    data_dir = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-c", POWER_CUT, str(manifest), str(data_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-4000:]
    with sqlite3.connect(data_dir / STORE_FILE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM travellers").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 2
    s = run_reindex(ReindexConfig(manifest, data_dir, use_ray=False, progress=False,
                                  store_batch_travellers=2))
    assert (s.embedded, s.skipped, s.enrolled) == (3, 2, 3)
    assert s.gallery_travellers == len(photos) == s.gallery_templates


def test_the_outcome_key_is_the_pipeline_fingerprint(tmp_path: Path, monkeypatch) -> None:
    """Remembered refusals are reused only under the same verdict settings: the pipeline's
    own fingerprint (Pipeline.settings_hash); how the embedders run does not enter it."""
    from dataclasses import replace

    from matcher.face import pipeline
    from matcher.face.pipeline import DetectorConfig
    from matcher.face.quality import DEFAULT_POLICY

    def key(**changes: Any) -> str:
        return ReindexConfig(tmp_path / "bookings.csv", tmp_path / "data",
                             **changes).embedding.outcome_key

    same = key()
    assert key(use_ray=False, ort_threads=2, batch_size=1, actors=3) == same
    pack = default_pack()
    changed = [key(flip=True),
               key(model_pack=ModelPack.from_paths(pack.detector.path, pack.detector.sha256,
                                                   pack.embedder.path, pack.embedder.sha256)),
               key(detector=DetectorConfig(max_side=640)),
               key(quality=replace(DEFAULT_POLICY, min_det_score=0.7))]
    monkeypatch.setattr(pipeline, "SCORE_REVISION", pipeline.SCORE_REVISION + 1)
    changed.append(key())
    assert same not in changed and len(set(changed)) == len(changed)


def test_the_ray_actors_get_only_the_workers_small_settings(tmp_path: Path) -> None:
    import pickle

    config = ReindexConfig(tmp_path / "bookings.csv", tmp_path / "data", flip=True,
                           ray_address="127.0.0.1:6379").embedding
    shipped = pickle.dumps(config.worker_kwargs())
    assert len(shipped) < 2048
    assert pickle.loads(shipped) == config.worker_kwargs()
    assert set(config.worker_kwargs()) == {"ort_threads", "detector", "quality", "flip",
                                           "model_pack"}
    # A pack given by path (as 'matcher serve' takes it) travels as two paths and sums.
    pack = default_pack()
    custom = ReindexConfig(tmp_path / "bookings.csv", tmp_path / "data",
                           model_pack=ModelPack.from_paths(
                               pack.detector.path, pack.detector.sha256,
                               pack.embedder.path, pack.embedder.sha256)).embedding
    assert len(pickle.dumps(custom.worker_kwargs())) < 2048
