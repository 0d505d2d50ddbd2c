"""Deployed the way a border post's IT runs services (issue 27), on real processes.

``matcher serve`` under a notify socket the test binds itself (as systemd would), a writer
that publishes by itself while a replica follows it, and a server started from a settings
file whose log is JSON. Real ``matcher serve`` processes on loopback, real SQLite, the
real client. Bounds here are protocol bounds (what systemd or the issue allow), set with
room for a loaded 2-core machine, never speed.
"""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from itertools import pairwise
from pathlib import Path

from _leaks import byte_forms, find_leaks, template_forms
from _server import METRICS_ANY_PORT, ServerProcess, metric
from grpc_health.v1 import health_pb2
from synthetic import templates

from matcher.client import make_probe
from matcher.transport import SERVICE
from matcher.v1 import matcher_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAR_FUTURE = 4_102_444_800.0


class NotifySocket:
    """The AF_UNIX datagram socket systemd would hand a Type=notify service, bound by the
    test. Every datagram is kept with its arrival time; ``on(state, check)`` runs
    ``check()`` the moment a datagram holding ``state`` arrives, before the next is read
    (to see what the server answers at that instant)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.received: list[tuple[float, list[str]]] = []
        self.checked: dict[str, object] = {}
        self._checks: dict[str, object] = {}
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def on(self, state: str, check) -> None:
        self._checks[state] = check

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            states = data.decode().split("\n")
            for state in states:
                check = self._checks.pop(state, None)
                if check is not None:
                    try:
                        self.checked[state] = check()
                    except Exception as exc:  # noqa: BLE001 - reported by the test
                        self.checked[state] = exc
            with self._arrived:
                self.received.append((time.monotonic(), states))
                self._arrived.notify_all()

    def states(self) -> list[str]:
        with self._arrived:
            return [s for _, states in self.received for s in states]

    def wait_for(self, predicate, timeout: float) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: predicate(self), timeout)

    def times_of(self, state: str) -> list[float]:
        with self._arrived:
            return [t for t, states in self.received if state in states]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_serve_tells_systemd_ready_only_when_serving_then_watchdog_then_stopping(tmp_path):
    watchdog_s = 2.0
    notify = NotifySocket(tmp_path / "notify.sock")
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log",
                           [*METRICS_ANY_PORT, "--drain-notice", "10"],
                           env={"NOTIFY_SOCKET": str(notify.path),
                                "WATCHDOG_USEC": str(int(watchdog_s * 1e6))})

    def health() -> int:
        with server.client() as client:
            return client.health(SERVICE, timeout=30)

    notify.on("READY=1", health)      # asked the instant READY=1 arrives
    notify.on("STOPPING=1", health)   # ... and STOPPING=1: the listener must still answer
    try:
        server.start()
        assert notify.wait_for(lambda n: "READY=1" in n.states(), 60), notify.states()
        assert notify.states()[0] == "READY=1", "nothing may come before READY=1"
        assert notify.checked["READY=1"] == SERVING
        # The watchdog pings from the serving loop at half WATCHDOG_USEC.
        assert notify.wait_for(lambda n: len(n.times_of("WATCHDOG=1")) >= 5, 60)
        pings = notify.times_of("WATCHDOG=1")
        gaps = [b - a for a, b in pairwise(pings)]
        # Median: one gap stretched by a busy machine is not the interval. Under systemd's
        # limit (WatchdogSec), and not a flood.
        assert watchdog_s / 4 <= statistics.median(gaps) <= watchdog_s, gaps
        ready_at = notify.times_of("READY=1")[0]
        assert pings[0] >= ready_at
        server.proc.send_signal(15)  # SIGTERM, as systemctl stop sends it
        assert notify.wait_for(lambda n: "STOPPING=1" in n.states(), 30), notify.states()
        assert server.proc.wait(60) == 0
        # Received before the listener closed: the health check was answered, NOT_SERVING.
        assert notify.checked["STOPPING=1"] == NOT_SERVING, notify.checked
        states = notify.states()
        assert states.count("READY=1") == 1
        assert "READY=1" not in states[states.index("STOPPING=1"):]
    finally:
        server.stop()
        notify.close()


def test_a_replica_follows_enrolments_with_nobody_calling_publish_snapshot(tmp_path):
    interval = 2.0
    writer = ServerProcess(tmp_path / "writer", tmp_path / "writer.log",
                           [*METRICS_ANY_PORT, "--publish-interval", str(interval),
                            "--watch-interval", "0.5"])
    replica = ServerProcess(tmp_path / "replica", tmp_path / "replica.log",
                            [*METRICS_ANY_PORT, "--replica-of", str(tmp_path / "writer" /
                                                                    "snapshots"),
                             "--watch-interval", "0.5"])
    travellers = templates(40, seed=27)
    with writer, writer.client() as enroller:
        model_id = enroller.gallery_info().model_id
        # The replica waits for the writer's first snapshot: published by itself, as the
        # empty gallery has never been published.
        with replica, replica.client() as reader:
            ages, version = [], 0
            for i, t in enumerate(travellers):
                version = enroller.enroll(f"T-{i:03d}", [make_probe(template=t,
                                                                    model_id=model_id)],
                                          valid_to=FAR_FUTURE).gallery_version
                ages.append(metric(replica.metrics_port, "matcher_snapshot_age_seconds"))
                time.sleep(0.25)
            deadline = time.monotonic() + 60
            while reader.gallery_info().gallery_version < version and time.monotonic() < deadline:
                ages.append(metric(replica.metrics_port, "matcher_snapshot_age_seconds"))
                time.sleep(0.25)
            info = reader.gallery_info()
            assert info.gallery_version == version and info.travellers == len(travellers)
            # Nothing changes now: the writer still publishes the unchanged gallery every
            # KEEPALIVE_INTERVALS intervals, so a quiet writer never looks like a lost one.
            deadline = time.monotonic() + 60
            while (reader.gallery_info().snapshot == info.snapshot
                   and time.monotonic() < deadline):
                time.sleep(0.5)
            again = reader.gallery_info()
            assert again.snapshot != info.snapshot and again.gallery_version == version
    print(f"replica snapshot age over {len(ages)} samples while enrolling every ~0.25 s: "
          f"max {max(ages):.1f} s, median {statistics.median(ages):.1f} s "
          f"(publish interval {interval:g} s)")
    assert max(ages) < interval + 5.0, ages
    published = Path(writer.log_path).read_bytes().count(b"published snapshot")
    assert published >= 2


def test_a_settings_file_starts_the_server_and_its_log_is_json(tmp_path, faces_dir, pipeline):
    """Flags override the file (--listen, --data); the file's log-format makes every line
    one JSON object, the request log's fields typed; no template or photo in it."""
    settings = tmp_path / "writer.toml"
    settings.write_text('listen = "127.0.0.1:9"\n'      # overridden by the test's --listen
                        f'data = "{tmp_path / "not-this"}"\n'
                        'log-format = "json"\n'
                        'metrics-listen = "127.0.0.1:0"\n'
                        'publish-interval = 0\n')
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log",
                           ["--config", str(settings)], client_kw={"lane_id": "K-07"})
    booking = (faces_dir / "obama_1.jpg").read_bytes()
    probe = (faces_dir / "obama_2.jpg").read_bytes()
    with server, server.client() as client:
        client.enroll("T-OBAMA", [booking], request_id="enrol-1")
        answer = client.verify("T-OBAMA", probe, request_id="verify-1")
        assert answer.decision == pb.MATCH
    assert not (tmp_path / "not-this").exists()
    lines = Path(server.log_path).read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    verify = [e for e in entries if e.get("rpc") == "Verify"]
    assert len(verify) == 1, verify
    v = verify[0]
    assert v["request_id"] == "verify-1" and v["lane_id"] == "K-07"
    assert v["decision"] == "MATCH" and isinstance(v["score"], float) and v["score"] > 0.3
    assert isinstance(v["total_ms"], float) and isinstance(v["frames_used"], int)
    enrol = [e for e in entries if e.get("rpc") == "Enroll"]
    assert enrol and enrol[0]["request_id"] == "enrol-1" and enrol[0]["added"] == 1
    log = b"\n".join(lines)
    forms = byte_forms(booking, "booking") + byte_forms(probe, "probe")
    for name, photo in (("booking", booking), ("probe", probe)):
        for face in pipeline.analyse(pipeline.decode_scaled(photo)):
            forms += template_forms(face.template, name)
    assert find_leaks(log, forms) == []
