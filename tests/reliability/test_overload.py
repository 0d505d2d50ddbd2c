"""Overload: offer ~3x the measured capacity for a bounded time, then drop back.

Capacity is measured first on this machine (closed loop: 8 lanes, each sending the next
photo when the last answer arrives), so the test means the same on a fast or a slow
runner. Then requests arrive open-loop at 3x that rate, each with a lane's 1 s deadline.
The server must answer every request with a clean code (OK, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED), keep its memory flat, and serve again once the load drops. How much it
sheds, how fast, and how many admitted requests run late are reported in the default run
and held to bounds only under ``--soak`` (a loaded machine moves them). The overload lasts
6 s in CI and ``--soak-overload-s`` (default 60 s) with ``--soak``, for each of the two queue
configurations; the server's RSS is sampled every second through it.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from _server import ServerProcess
from PIL import Image

from matcher.v1 import matcher_pb2 as pb

LANES = 8
DEADLINE_S = 1.0
OVERLOAD_FACTOR = 3.0
RSS_GROWTH_BOUND_KIB = 64 * 1024
# Of the requests the server admitted (not shed), at most this share may miss the deadline.
MAX_ADMITTED_DEADLINE_MISS = 0.05
RECOVERY_S = 4.0
RSS_SAMPLE_S = 1.0


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_code: dict[str, list[float]] = field(default_factory=dict)  # code -> latencies (s)
    sent: list[tuple[float, str]] = field(default_factory=list)    # (send time, code)
    started: float = 0.0

    def add(self, code: grpc.StatusCode, latency_s: float, sent_at: float = 0.0) -> None:
        with self.lock:
            self.by_code.setdefault(code.name, []).append(latency_s)
            self.sent.append((sent_at, code.name))

    def ok_share_after(self, t: float) -> float:
        """Share of OK among the requests sent at or after monotonic time ``t``."""
        late = [code for sent_at, code in self.sent if sent_at >= t]
        return sum(code == "OK" for code in late) / max(1, len(late))

    def count(self, code: str) -> int:
        return len(self.by_code.get(code, []))

    def total(self) -> int:
        return sum(len(v) for v in self.by_code.values())

    def p(self, code: str, q: float) -> float:
        values = self.by_code.get(code)
        return float(np.percentile(values, q)) if values else float("nan")


@pytest.fixture(scope="module")
def photo(faces_dir: Path) -> bytes:
    """A lane-sized real photo (long side 640)."""
    with Image.open(faces_dir / "biden_1.jpg") as im:
        face = im.convert("RGB")
    face.thumbnail((640, 640))
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _closed_loop(server: ServerProcess, request: pb.IdentifyRequest, seconds: float
                 ) -> tuple[float, Outcomes]:
    """Answers per second with LANES lanes each waiting for its previous answer."""
    outcomes = Outcomes()
    stop_at = time.monotonic() + seconds

    def lane() -> None:
        with server.client() as client:
            for _ in range(10_000):
                if time.monotonic() >= stop_at:
                    return
                t = time.monotonic()
                try:
                    client.stub.Identify(request, timeout=10 * DEADLINE_S)
                    outcomes.add(grpc.StatusCode.OK, time.monotonic() - t)
                except grpc.RpcError as exc:
                    outcomes.add(exc.code(), time.monotonic() - t)

    threads = [threading.Thread(target=lane) for _ in range(LANES)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return outcomes.count("OK") / (time.monotonic() - start), outcomes


def _open_loop(server: ServerProcess, request: pb.IdentifyRequest, rate: float,
               seconds: float) -> Outcomes:
    """Send at a fixed ``rate`` regardless of answers (lanes do not wait for each other)."""
    outcomes = Outcomes()
    done = threading.Semaphore(0)
    n = int(rate * seconds)
    with server.client() as client:
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            future = client.stub.Identify.future(request, timeout=DEADLINE_S)

            def finished(f, sent=sent) -> None:
                outcomes.add(f.code(), time.monotonic() - sent, sent)
                done.release()

            future.add_done_callback(finished)
        for _ in range(n):
            if not done.acquire(timeout=30):
                raise TimeoutError("requests were never answered")
    return outcomes


@dataclass
class Run:
    capacity: float
    offered: float
    seconds: float
    base: Outcomes
    load: Outcomes
    recovery: Outcomes
    rss_growth_kib: int
    max_queue: int | None
    rss_kib: tuple[int, int, int]  # at the start of the overload, at its end, the highest


def _sample_rss(server: ServerProcess, stop: threading.Event, samples: list[int]) -> None:
    """The server's RSS every RSS_SAMPLE_S until ``stop`` is set."""
    while not stop.wait(RSS_SAMPLE_S):
        samples.append(server.rss_kib())


def _overload_run(folder: Path, photo: bytes, seconds: float, max_queue: int | None,
                  capacity: float | None = None) -> Run:
    """Start a server, measure capacity (unless given), offer 3x, then half of capacity."""
    args = ["--metrics-listen", "off"]
    if max_queue is not None:
        args += ["--max-queue", str(max_queue)]
    server = ServerProcess(folder / "data", folder / "server.log", args, verbose=False)
    with server:
        with server.client() as client:
            client.enroll("T-LOAD", [photo], valid_from=0.0, valid_to=4e9)
        request = pb.IdentifyRequest(probe=pb.Probe(image=photo), lane_id="K-LOAD")
        _closed_loop(server, request, 1.5)            # warm-up: threads, arenas, caches
        measured, base = _closed_loop(server, request, 3.0)
        capacity = capacity or measured
        assert capacity > 0, "nothing answered while measuring capacity; is the server alive?"
        rss_before = server.rss_kib()
        samples: list[int] = [rss_before]
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(server, stop, samples))
        sampler.start()
        try:
            load = _open_loop(server, request, OVERLOAD_FACTOR * capacity, seconds)
        finally:
            stop.set()
            sampler.join(10)
        rss_after = server.rss_kib()
        rss_growth = rss_after - rss_before
        recovery_start = time.monotonic()
        recovery = _open_loop(server, request, 0.5 * capacity, RECOVERY_S)
    recovery.started = recovery_start
    return Run(capacity, OVERLOAD_FACTOR * capacity, seconds, base, load, recovery,
               rss_growth, max_queue, (rss_before, rss_after, max(samples + [rss_after])))


def _summary(run: Run) -> dict[str, object]:
    load = run.load
    return {
        "max_queue": run.max_queue or "default",
        "capacity_per_s": round(run.capacity, 1), "offered_per_s": round(run.offered, 1),
        "seconds": run.seconds, "ok": load.count("OK"),
        "shed_resource_exhausted": load.count("RESOURCE_EXHAUSTED"),
        "deadline_exceeded": load.count("DEADLINE_EXCEEDED"),
        "ok_p99_ms": round(1e3 * load.p("OK", 99), 1),
        "shed_p95_ms": round(1e3 * load.p("RESOURCE_EXHAUSTED", 95), 1),
        "baseline_p99_ms": round(1e3 * run.base.p("OK", 99), 1),
        "recovery_p99_ms": round(1e3 * run.recovery.p("OK", 99), 1),
        "recovery_ok_share": round(run.recovery.count("OK") / max(1, run.recovery.total()), 3),
        "rss_growth_mib": round(run.rss_growth_kib / 1024, 1),
        "rss_start_end_max_mib": [round(k / 1024, 1) for k in run.rss_kib],
    }


def _check(run: Run, soak: bool) -> None:
    """Correctness always: only clean codes, every request answered (``_open_loop`` waits
    for each), memory flat, the server serving again after the load. The speed figures
    (how much was shed, how fast, how many admitted requests ran late) are reported by
    ``_summary``; a busy machine can move them, so only ``--soak`` holds them to bounds."""
    load = run.load
    assert set(load.by_code) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, \
        load.by_code.keys()
    assert load.count("OK") > 0, "nothing was answered under load"
    assert run.rss_growth_kib < RSS_GROWTH_BOUND_KIB, \
        f"RSS grew {run.rss_growth_kib / 1024:.0f} MiB under overload"
    assert set(run.recovery.by_code) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    assert run.recovery.count("OK") > 0, "nothing was answered once the load dropped"
    if not soak:
        return
    shed, ok, late = (load.count("RESOURCE_EXHAUSTED"), load.count("OK"),
                      load.count("DEADLINE_EXCEEDED"))
    assert shed > 0, "3x capacity was offered but nothing was shed"
    assert ok > 0.5 * run.capacity * run.seconds, f"only {ok} answered under load"
    # Shedding is a queue-full check at arrival: the answer comes back long before the
    # deadline.
    assert load.p("RESOURCE_EXHAUSTED", 95) < DEADLINE_S / 4
    # Recovered: once the load has dropped to half capacity, the second half of that
    # window is answered (nearly) in full. The first half may still see a few sheds while
    # the backlog and the admission estimate settle.
    recovered = run.recovery.ok_share_after(run.recovery.started + RECOVERY_S / 2)
    assert recovered >= 0.95, {k: len(v) for k, v in run.recovery.by_code.items()}
    assert late <= MAX_ADMITTED_DEADLINE_MISS * (ok + late), \
        f"{late} of {ok + late} admitted requests missed the {DEADLINE_S} s deadline"


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory, photo, budget, tally) -> Run:
    """The default configuration (max_queue 64) at 3x its measured capacity."""
    run = _overload_run(tmp_path_factory.mktemp("overload-default"), photo,
                        budget.overload_s(6.0), None)
    tally.figure("overload.default_queue", _summary(run))
    print("overload, default queue:", _summary(run))
    return run


def test_three_times_capacity_with_a_deadline_sized_queue(tmp_path, photo, capacity_run,
                                                          budget, tally):
    """The operator sizes --max-queue to a quarter of a deadline of work (the client
    sending 3x shares the 2 cores, so the server runs slower than measured): every request
    gets a clean answer, memory stays flat, the server serves once the load drops; under
    --soak also every admitted request in time and the rest shed at once."""
    max_queue = max(4, int(capacity_run.capacity * DEADLINE_S * 0.25))
    run = _overload_run(tmp_path, photo, budget.overload_s(6.0), max_queue,
                        capacity=capacity_run.capacity)
    tally.figure("overload.sized_queue", _summary(run))
    print("overload, queue sized to the deadline:", _summary(run))
    _check(run, budget.soak)
    tally.figure("overload.level_held", f"{OVERLOAD_FACTOR:.0f}x capacity "
                 f"({run.offered:.0f}/s) for {run.seconds:.0f} s")


def test_three_times_capacity_with_the_default_queue(capacity_run, budget):
    """Finding F6 (fixed): with a queue counted in items, most admitted requests waited
    past the deadline; admission now refuses what cannot be served in time."""
    _check(capacity_run, budget.soak)
