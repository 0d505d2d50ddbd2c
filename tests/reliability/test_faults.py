"""Faults of a border post, on real `matcher serve` processes: a full disk, another process
holding the store's write lock, a replica's snapshot share that disappears.

Probes and enrolments are templates (no model compute), so each loop is about the fault.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from _server import METRICS_ANY_PORT, ServerProcess, metric
from synthetic import templates, unit

from matcher.client import make_probe
from matcher.face.models import default_pack
from matcher.gallery.primary import PrimaryGallery
from matcher.gallery.snapshot import verify_snapshot
from matcher.service.audit import verify_chain
from matcher.v1 import matcher_pb2 as pb

FAR_FUTURE = 4_102_444_800.0


def _one_traveller(n: int, seed: int) -> np.ndarray:
    """n templates of one person (one direction, a little noise each): a booking's photos
    must show one traveller (the enrolment rule refuses a mix as photos_disagree)."""
    noise = np.random.default_rng(seed + 1).standard_normal((n, 512))
    return unit(templates(1, seed) + 0.02 * noise)


def _probes(x: np.ndarray) -> list[pb.Probe]:
    return [make_probe(template=t) for t in x]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted for the test (needs root; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(path: Path, leave: int) -> None:
    """Write ``path`` until the filesystem has about ``leave`` bytes free (0: none)."""
    st = os.statvfs(path.parent)
    room = st.f_bavail * st.f_frsize - leave
    chunk = b"\0" * (64 * 1024)
    with open(path, "ab") as f:
        try:
            while room > 0:
                room -= f.write(chunk[:min(len(chunk), room)])
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def test_disk_full_refuses_writes_loses_nothing_and_recovers_without_restart(
        small_disk, tmp_path, tally):
    data = small_disk / "data"
    server = ServerProcess(data, tmp_path / "serve.log", METRICS_ANY_PORT)
    ref = templates(1, seed=1)
    acked: dict[str, int] = {}
    with server:
        with server.client() as client:
            client.enroll("T-ref", _probes(ref), valid_from=0, valid_to=FAR_FUTURE)
            _fill(small_disk / "filler", leave=512 * 1024)
            refusal = None
            for i in range(400):
                tid = f"T-{i:04d}"
                try:
                    client.enroll(tid, _probes(_one_traveller(16, seed=100 + i)), valid_from=0,
                                  valid_to=FAR_FUTURE)
                    acked[tid] = 16
                except grpc.RpcError as exc:
                    refusal = exc
                    break
            assert refusal is not None, "the disk never filled up"
            assert refusal.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.UNAVAILABLE), refusal
            assert "disk" in refusal.details() and "full" in refusal.details()
            tally.figure("faults.disk_full_enrolments_acked", len(acked))
            tally.figure("faults.disk_full_enrol_status", refusal.code().name)

            # Not a byte left: the audit log's last page fills, then decisions are refused
            # (fail_closed, the default) instead of being answered unaudited.
            _fill(small_disk / "filler2", leave=0)
            refused = None
            for _ in range(200):
                try:
                    assert client.identify(template=ref[0]).traveller_id == "T-ref"
                except grpc.RpcError as exc:
                    refused = exc
                    break
            assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit log" in refused.details() and "fail_closed" in refused.details()
            assert server.alive() and client.health() == 1  # SERVING

            (small_disk / "filler").unlink()
            (small_disk / "filler2").unlink()
            # Space is back: the refused enrolment goes through, no restart.
            client.enroll("T-again", _probes(_one_traveller(16, seed=99)), valid_from=0,
                          valid_to=FAR_FUTURE)
            acked["T-again"] = 16
            assert client.identify(template=ref[0]).traveller_id == "T-ref"
            for tid, n in acked.items():
                assert client.get_traveller(tid).templates == n
    with ServerProcess(data, tmp_path / "serve.log") as again, again.client() as client:
        for tid, n in acked.items():
            assert client.get_traveller(tid).templates == n
    assert verify_chain(data / "audit.log").ok


_HOLD_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_store_locked_by_another_process(tmp_path, tally):
    data = tmp_path / "data"
    x = templates(2, seed=7)
    server = ServerProcess(data, tmp_path / "serve.log")
    with server:
        with server.client() as client:
            client.enroll("T-0", _probes(x[:1]), valid_from=0, valid_to=FAR_FUTURE)
            holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK,
                                       str(data / "gallery.sqlite3")], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout.readline().strip() == "holding"
                outcome: dict[str, object] = {}

                def enrol() -> None:
                    t = time.monotonic()
                    try:
                        client.enroll("T-1", _probes(x[1:]), valid_from=0,
                                      valid_to=FAR_FUTURE, timeout=60)
                        outcome["code"] = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        outcome["code"], outcome["details"] = exc.code(), exc.details()
                    outcome["s"] = time.monotonic() - t

                writer = threading.Thread(target=enrol)
                writer.start()
                # While the write waits, 1:N and 1:1 answer as usual.
                latencies = []
                for _ in range(20):
                    t = time.monotonic()
                    assert client.identify(template=x[0]).traveller_id == "T-0"
                    assert client.verify("T-0", template=x[0]).decision == pb.MATCH
                    latencies.append((time.monotonic() - t) * 1e3)
                writer.join(90)
                # The server gives up on its own (its bounded wait), well before the
                # client's 60 s deadline, and says why.
                assert outcome["code"] == grpc.StatusCode.UNAVAILABLE, outcome
                assert "locked by another process" in outcome["details"]
                tally.figure("faults.locked_store_enrol_answer_s", round(outcome["s"], 1))
                tally.figure("faults.locked_store_identify_verify_ms_median",
                             round(float(np.median(latencies)), 1))
                # A short deadline is answered by that deadline.
                with pytest.raises(grpc.RpcError) as short:
                    client.enroll("T-1", _probes(x[1:]), valid_from=0, valid_to=FAR_FUTURE,
                                  timeout=2)
                assert short.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                              grpc.StatusCode.UNAVAILABLE)
                # Shut down with a write stuck behind the lock: nothing hangs.
                late = threading.Thread(target=enrol)
                late.start()
                t = time.monotonic()
                code = server.stop(timeout=60)
                tally.figure("faults.locked_store_shutdown_s", round(time.monotonic() - t, 1))
                assert code == 0
                late.join(60)
            finally:
                holder.stdin.close()
                holder.wait(30)
    with ServerProcess(data, tmp_path / "serve.log") as again, again.client() as client:
        client.enroll("T-1", _probes(x[1:]), valid_from=0, valid_to=FAR_FUTURE)
        assert client.identify(template=x[1]).traveller_id == "T-1"


def test_a_replica_keeps_serving_when_its_snapshot_share_disappears(tmp_path):
    share = tmp_path / "share"
    x = templates(4, seed=11)
    model_id = default_pack().model_id  # what the replica's pipeline runs
    with PrimaryGallery.open(tmp_path / "writer", model_id) as writer:
        for i in range(3):
            writer.enroll(f"T{i}", x[i], 0.0, FAR_FUTURE, [f"{i:064x}"])
        writer.rebuild()  # a snapshot holds the built index, not the delta since
        first = writer.export_snapshot(share)
        replica = ServerProcess(tmp_path / "replica", tmp_path / "replica.log",
                                ["--replica-of", str(share), "--watch-interval", "0.3",
                                 *METRICS_ANY_PORT])
        with replica, replica.client() as client:
            mport = replica.metrics_port
            assert client.gallery_info().snapshot == first.name
            created = verify_snapshot(first).created_at
            gone = tmp_path / "share.gone"
            share.rename(gone)
            assert replica.wait_for_output(b"is gone or unreadable", 60)
            assert client.identify(template=x[1]).traveller_id == "T1"
            assert metric(mport, "matcher_snapshot_source_up") == 0
            # the age of the snapshot it still serves, and it keeps growing
            asked = time.time()
            age = metric(mport, "matcher_snapshot_age_seconds")
            assert asked - created <= age <= time.time() - created
            time.sleep(0.05)
            assert metric(mport, "matcher_snapshot_age_seconds") > age

            writer.enroll("T3", x[3], 0.0, FAR_FUTURE, [f"{3:064x}"])
            writer.rebuild()
            second = writer.export_snapshot(gone)
            gone.rename(share)
            assert replica.wait_for_output(b"reachable again", 60)
            assert replica.wait_for_output(f"hot-swapped to snapshot {second.name}".encode(), 60)
            assert client.gallery_info().snapshot == second.name
            assert client.identify(template=x[3]).traveller_id == "T3"
            assert metric(mport, "matcher_snapshot_source_up") == 1
