"""Lane simulator: N lanes calling the service at once, each waiting for its answer before
sending the next face (as a real e-gate does); reports latency percentiles and throughput.

    matcher lane --server 127.0.0.1:50051 --lanes 40 --duration 30 photos/*.jpg
    matcher lane --server 127.0.0.1:50051 --lanes 40 --interval 2 --duration 60 photos/*.jpg

Without ``--interval`` every lane sends back to back (the worst case: the service's
capacity shows as throughput, and latency is mostly queueing). With it, each lane starts a
request every INTERVAL seconds (a traveller stepping up), staggered across lanes, which
shows the latency a lane sees at a given load.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from .client import MatcherClient
from .v1 import matcher_pb2 as pb


@dataclass
class LaneReport:
    """Wall-clock latencies in ms of answered calls; failures by status code name."""

    lanes: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    decisions: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    # Every call, when asked for (run_lanes(timeline=True)): (seconds from the run's start
    # when it was sent, latency ms, decision or status code name), in no particular order.
    timeline: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {"lanes": self.lanes, "seconds": round(self.seconds, 3),
                "answered": self.answered, "failed": self.failed,
                "throughput_per_s": round(self.throughput, 2),
                "p50_ms": round(self.percentile(50), 2), "p95_ms": round(self.percentile(95), 2),
                "p99_ms": round(self.percentile(99), 2),
                "decisions": dict(self.decisions), "errors": dict(self.errors)}

    def text(self) -> str:
        s = self.summary()
        lines = [f"lanes {s['lanes']}  answered {s['answered']}  failed {s['failed']}  "
                 f"in {s['seconds']:.1f} s  ->  {s['throughput_per_s']:.1f} answers/s",
                 f"latency ms  p50 {s['p50_ms']:.1f}  p95 {s['p95_ms']:.1f}  "
                 f"p99 {s['p99_ms']:.1f}",
                 "decisions   " + "  ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))]
        if s["errors"]:
            lines.append("errors      " + "  ".join(f"{k} {v}" for k, v in
                                                    sorted(s["errors"].items())))
        return "\n".join(lines)


def run_lanes(target: str | Sequence[str], images: Sequence[bytes], lanes: int, *,
              requests_per_lane: int | None = None, duration_s: float | None = None,
              rpc: str = "identify", traveller_ids: Sequence[str] | None = None,
              token: str | None = None, timeout: float = 5.0, ca=None, cert=None, key=None,
              server_name: str | None = None, stop: threading.Event | None = None,
              on_answer: Callable[[str], None] | None = None,
              interval_s: float | None = None, timeline: bool = False,
              client: MatcherClient | None = None) -> LaneReport:
    """Drive ``lanes`` concurrent lanes until each sent ``requests_per_lane`` or
    ``duration_s`` passed (or ``stop`` is set). Lane i starts at image i so lanes differ.

    ``rpc``: identify, verify or clear; verify/clear claim ``traveller_ids[j]`` for
    ``images[j]``. ``on_answer(decision_name)`` is called from the lane threads after
    every answer (progress for a caller that changes something mid-run). ``interval_s``:
    each lane starts a request every that many seconds instead of back to back (lane i
    first waits i/lanes of an interval, so lanes do not arrive in step). ``timeline``:
    keep every call's send time, latency and outcome (``LaneReport.timeline``).
    ``client``: a MatcherClient to share (default: one made from the other arguments and
    closed at the end); calls go through its methods, so its failover and hedging apply.
    """
    if not images:
        raise ValueError("the lane simulator needs at least one image")
    if requests_per_lane is None and duration_s is None and stop is None:
        raise ValueError("give requests_per_lane, duration_s or a stop event")
    if rpc in ("verify", "clear") and (traveller_ids is None or len(traveller_ids) != len(images)):
        raise ValueError(f"{rpc} needs one traveller id per image")
    claims: Sequence[str] = traveller_ids or ()  # verify/clear: one per image, checked above
    stop = stop or threading.Event()
    report = LaneReport(lanes, 0.0)
    lock = threading.Lock()
    own_client = client is None
    if client is None:
        client = MatcherClient(target, token=token, ca=ca, cert=cert, key=key,
                               timeout=timeout, server_name=server_name)
    start_gate = threading.Barrier(lanes + 1)
    run_began = [0.0]

    def lane(number: int) -> None:
        lane_id = f"lane-{number:02d}"
        latencies: list[float] = []
        decisions: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        calls: list[tuple[float, float, str]] = []
        start_gate.wait()
        began = time.monotonic()
        end = None if duration_s is None else began + duration_s
        sent = 0
        if interval_s and stop.wait(interval_s * number / lanes):
            return
        while not stop.is_set():
            if requests_per_lane is not None and sent >= requests_per_lane:
                break
            if end is not None and time.monotonic() >= end:
                break
            j = (number + sent) % len(images)
            sent += 1
            t = time.perf_counter()
            sent_at = time.monotonic() - run_began[0]
            try:
                if rpc == "identify":
                    req = pb.IdentifyRequest(probe=pb.Probe(image=images[j]), lane_id=lane_id)
                    resp = client.read("Identify", req, timeout)
                elif rpc == "verify":
                    req = pb.VerifyRequest(probe=pb.Probe(image=images[j]), lane_id=lane_id,
                                           traveller_id=claims[j])
                    resp = client.read("Verify", req, timeout)
                else:
                    req = pb.ClearRequest(probe=pb.Probe(image=images[j]), lane_id=lane_id,
                                          claimed_traveller_id=claims[j])
                    resp = client.read("Clear", req, timeout)
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1
                if timeline:
                    calls.append((sent_at, (time.perf_counter() - t) * 1e3, exc.code().name))
            else:
                latency_ms = (time.perf_counter() - t) * 1e3
                latencies.append(latency_ms)
                name = pb.Decision.Name(resp.decision)
                decisions[name] += 1
                if timeline:
                    calls.append((sent_at, latency_ms, name))
                if on_answer is not None:
                    on_answer(name)
            if interval_s:
                pause = began + interval_s * (sent + number / lanes) - time.monotonic()
                if pause > 0 and stop.wait(pause):
                    break
        with lock:
            report.latencies_ms.extend(latencies)
            report.decisions.update(decisions)
            report.errors.update(errors)
            report.timeline.extend(calls)

    threads = [threading.Thread(target=lane, args=(i,), name=f"lane-{i}", daemon=True)
               for i in range(lanes)]
    for t in threads:
        t.start()
    try:
        run_began[0] = time.monotonic()
        start_gate.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        report.seconds = time.perf_counter() - began
    finally:
        stop.set()
        if own_client:
            client.close()
    return report
