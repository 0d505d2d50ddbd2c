"""The overnight job on a real multi-node Ray cluster, every address 127.0.0.1.

A helper process (``tests/loopback_ray_cluster.py``, Ray's own ``Cluster`` test utility)
starts a GCS and two raylets of one CPU each on loopback, with Ray token authentication
on; ``matcher reindex --ray-address 127.0.0.1:PORT`` then runs against it in its own
process, as an operator would run it. The cluster is stopped, and checked gone, whatever
the test's outcome.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import ipaddress
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from matcher.face.models import default_pack
from matcher.gallery.primary import STORE_FILE
from matcher.gallery.snapshot import verify_snapshot
from matcher.gallery.store import Store
from matcher.reindex.embedding import PhotoEmbedder, unpack_faces
from matcher.reindex.report import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("loopback_ray_cluster.py")
NODES = 2
CLUSTER_START_S = 180.0  # two raylets on a loaded 2-core machine; normally a few seconds
CLUSTER_STOP_S = 120.0
DAY = 86_400.0


@dataclass
class LoopbackCluster:
    address: str            # "127.0.0.1:PORT" of the GCS
    node_ids: list[str]     # hex Ray node ids, head first
    temp_dir: str
    pgid: int               # the helper's process group: every process of the cluster
    driver_env: dict[str, str]


# -- processes and sockets, read from /proc (Linux) -------------------------------------

def _pgid_and_cmdline(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    pgid = int(stat[stat.rindex(")") + 2:].split()[2])  # after "pid (comm) state ppid"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    return pgid, cmdline.decode(errors="replace")


def _cluster_processes(pgid: int, temp_dir: str | None = None) -> dict[int, str]:
    """pid -> command line of the cluster's live processes: those in the helper's process
    group, or naming its temp dir (raylet, gcs_server, agents) in case one left it."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            group, cmdline = _pgid_and_cmdline(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if (group == pgid or (temp_dir and temp_dir in cmdline)) and cmdline:  # "" is a zombie
            found[int(entry.name)] = cmdline
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until these processes exit; the ones still alive."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for fd in fds:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    sel.unregister(key.fd)
            return [fds[fd] for fd in sel.get_map()]
    finally:
        for fd in fds:
            os.close(fd)


def _tcp_sockets() -> dict[int, tuple[str, str, str]]:
    """socket inode -> (local ip, remote ip, state hex) for every TCP socket."""
    def ip(hexaddr: str) -> str:
        raw = bytes.fromhex(hexaddr)
        # /proc prints each 32-bit word in host (little-endian) order.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        return str(ipaddress.ip_address(raw))

    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                out[int(f[9])] = (ip(f[1].split(":")[0]), ip(f[2].split(":")[0]), f[3])
    return out


def _listening_and_peers(pids: list[int]) -> tuple[set[str], set[str]]:
    """The IPs these processes listen on, and those of the peers they are connected to."""
    sockets = _tcp_sockets()
    listening, peers = set(), set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                        local, remote, state = sockets[int(target[8:-1])]
                        if state == "0A":  # TCP_LISTEN
                            listening.add(local)
                        elif state == "01":  # TCP_ESTABLISHED
                            peers.add(remote)
    return listening, peers


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None
                                and addr.ipv4_mapped.is_loopback)


# -- the cluster ----------------------------------------------------------------------

def _read_json_line(proc: subprocess.Popen, timeout: float, log: Path) -> dict:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"the Ray cluster did not start in {timeout:.0f} s:\n"
                        + log.read_text()[-4000:])
    line = proc.stdout.readline()
    if not line:
        pytest.fail("the Ray cluster helper exited:\n" + log.read_text()[-4000:])
    return json.loads(line)


def _stop(proc: subprocess.Popen, temp_dir: str | None) -> list[str]:
    """Stop the helper (it stops every node), kill whatever survived it, and return a
    description of the processes that had to be killed."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the helper's cue to stop the cluster
    try:
        proc.wait(timeout=CLUSTER_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Workers exit on their own once their raylet is gone; give them time to notice.
    left = _cluster_processes(proc.pid, temp_dir)
    alive = _wait_gone(list(left), timeout=30)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(alive, timeout=30)
    return [f"{pid} {left[pid][:120]}" for pid in alive]


@contextlib.contextmanager
def loopback_cluster(log: Path) -> Iterator[LoopbackCluster]:
    # Short and outside pytest's tmp_path: Ray puts unix sockets under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="mray-", dir="/tmp")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # No RAY_* from outside (a RAY_ADDRESS would point elsewhere).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | auth
    proc = None
    try:
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(HELPER), temp_dir, str(NODES), "1"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                env=env, start_new_session=True)
        info = _read_json_line(proc, CLUSTER_START_S, log)
        # The driver gets the token but not the loopback switch: `matcher reindex` must
        # set that itself for a 127.0.0.1 address.
        yield LoopbackCluster(info["address"], info["node_ids"], temp_dir, proc.pid,
                              env | {"RAY_TMPDIR": temp_dir})
    finally:
        survivors = _stop(proc, temp_dir) if proc is not None else []
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes outlived the cluster's stop: {survivors}"


def _write_manifest(path: Path, faces_dir: Path, files: list[str]) -> dict[str, str]:
    """One traveller per photo; returns traveller_id -> file."""
    now = time.time()
    vf = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - DAY))
    vt = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 2 * DAY))
    travellers = {f"C-{i:03d}": name for i, name in enumerate(files)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["traveller_id", "photo", "valid_from", "valid_to"])
        w.writerows([tid, str(faces_dir / name), vf, vt] for tid, name in travellers.items())
    return travellers


def test_night_on_a_two_node_loopback_cluster(tmp_path: Path, faces_dir: Path,
                                              face_labels: dict) -> None:
    files = sorted(face_labels)
    travellers = _write_manifest(tmp_path / "bookings.csv", faces_dir, files)
    data_dir = tmp_path / "data"
    with loopback_cluster(tmp_path / "cluster.log") as cluster:
        assert cluster.address.startswith("127.0.0.1:")
        assert len(set(cluster.node_ids)) == NODES
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "matcher.cli", "reindex",
             "--manifest", str(tmp_path / "bookings.csv"), "--data", str(data_dir),
             "--ray-address", cluster.address, "--actors", str(NODES), "--batch-size", "2",
             "--actor-start-timeout", "300", "--no-progress", "--json"],
            cwd=REPO, env=cluster.driver_env, capture_output=True, text=True, timeout=400)
        seconds = time.perf_counter() - started
        assert proc.returncode == 0, proc.stderr[-4000:]
        ours = _cluster_processes(cluster.pgid, cluster.temp_dir)
        raylets = [pid for pid, cmd in ours.items() if cmd.split()[0].endswith("/raylet")]
        assert len(raylets) == NODES, ours
        listening, peers = _listening_and_peers(list(ours))

    # Stopped: no process of the cluster is left, raylets included.
    assert not _cluster_processes(cluster.pgid, cluster.temp_dir)
    assert not [pid for pid in raylets if Path(f"/proc/{pid}").exists()]

    summary = json.loads((data_dir / SUMMARY_FILE).read_text())
    assert summary == json.loads(proc.stdout)
    print(f"\ncluster run: {summary['embedded']} photos in {seconds:.1f} s "
          f"({summary['photos_per_s']:.1f} photos/s embedding) on "
          f"{len(summary['photos_by_node'])} nodes: {summary['photos_by_node']}; "
          f"listening on {sorted(listening)}, peers {sorted(peers)}")

    # Every photo embedded, and on every node of the cluster.
    assert summary["embedded"] == len(files)
    assert set(summary["photos_by_node"]) == set(cluster.node_ids)
    assert sum(summary["photos_by_node"].values()) == len(files)

    # Only loopback: what the cluster listened on and whom it talked to.
    assert listening and all(map(_is_loopback, listening)), listening
    assert peers and all(map(_is_loopback, peers)), peers

    # The outcome is the photos' own: single faces enrolled, group photos refused.
    single = {tid for tid, name in travellers.items() if face_labels[name]["faces"] == "1"}
    assert summary["enrolled"] == len(single)
    assert summary["rejects_by_reason"] == {"multiple_faces": len(files) - len(single)}
    verify_snapshot(Path(summary["snapshot"]))

    # Each traveller got the template of their own photo: the one the same embedder
    # computes for that photo in this process.
    with Store.open(data_dir / STORE_FILE, default_pack().model_id) as store:
        rows = store.read_all()
    assert sorted(rows.traveller_ids) == sorted(single)
    paths = [str(faces_dir / travellers[tid]) for tid in rows.traveller_ids]
    shas = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]
    reasons, blobs = PhotoEmbedder().embed(shas, paths)
    for i, (path, reason, blob) in enumerate(zip(paths, reasons, blobs, strict=True)):
        assert not reason, (path, reason)
        (template,) = rows.vectors[rows.owner == i]
        (face,), _ = unpack_faces(blob)
        assert float(np.dot(template, face.template)) > 0.999, path


def test_an_address_nobody_answers_at_fails_at_once(tmp_path: Path, faces_dir: Path) -> None:
    # Ray itself would retry such an address for ever, without a word.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    _write_manifest(tmp_path / "bookings.csv", faces_dir, ["obama_1.jpg"])
    proc = subprocess.run(
        [sys.executable, "-m", "matcher.cli", "reindex",
         "--manifest", str(tmp_path / "bookings.csv"), "--data", str(tmp_path / "data"),
         "--ray-address", f"127.0.0.1:{port}", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in proc.stderr


LOCAL_RAY = """
import json, sys
from pathlib import Path
from matcher.reindex.embedding import start_ray
from matcher.reindex.job import ReindexConfig
start_ray(ReindexConfig(Path("unused.csv"), Path("unused"), num_cpus=1).embedding)
import ray
ray.get(ray.remote(lambda: None).remote())  # a worker process up as well
print(json.dumps([n["NodeManagerAddress"] for n in ray.nodes()]), flush=True)
sys.stdin.read()
ray.shutdown()
"""


def test_the_private_local_instance_stays_on_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(tmp_path / "ray.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    try:
        node_addresses = _read_json_line(proc, CLUSTER_START_S, tmp_path / "ray.log")
        listening, peers = _listening_and_peers(list(_cluster_processes(proc.pid)))
    finally:
        survivors = _stop(proc, None)
    assert not survivors
    assert node_addresses == ["127.0.0.1"]
    assert listening and all(map(_is_loopback, listening)), listening
    assert all(map(_is_loopback, peers)), peers


def test_actors_the_cluster_cannot_place_fail_the_run_with_the_reason(
        tmp_path: Path, faces_dir: Path) -> None:
    # Without the start timeout the job would wait for them for ever.
    _write_manifest(tmp_path / "bookings.csv", faces_dir, ["obama_1.jpg", "biden_1.jpg"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "matcher.cli", "reindex",
         "--manifest", str(tmp_path / "bookings.csv"), "--data", str(tmp_path / "data"),
         "--num-cpus", "1", "--memory-per-actor-mb", str(10 ** 8),
         "--actor-start-timeout", "1", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "embedder actors were not all up after 1 s" in proc.stderr
    assert "100000000 MB" in proc.stderr
