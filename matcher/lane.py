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


@dataclass(frozen=True)
class _Plan:
    """What every lane of one run does: the probes, the call, when to stop, what to keep."""

    images: Sequence[bytes]
    lanes: int
    rpc: str
    claims: Sequence[str]                  # verify/clear: the traveller id of each image
    timeout: float
    stop: threading.Event
    requests_per_lane: int | None
    duration_s: float | None
    interval_s: float | None
    timeline: bool
    on_answer: Callable[[str], None] | None


@dataclass
class _Tally:
    """One lane's results, kept apart from the others' until the lane ends (no lock)."""

    latencies_ms: list[float] = field(default_factory=list)
    decisions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    calls: list[tuple[float, float, str]] = field(default_factory=list)

    def add_to(self, report: LaneReport) -> None:
        report.latencies_ms.extend(self.latencies_ms)
        report.decisions.update(self.decisions)
        report.errors.update(self.errors)
        report.timeline.extend(self.calls)


def _check_plan(images: Sequence[bytes], rpc: str, traveller_ids: Sequence[str] | None,
                requests_per_lane: int | None, duration_s: float | None,
                stop: threading.Event | None) -> None:
    if not images:
        raise ValueError("the lane simulator needs at least one image")
    if requests_per_lane is None and duration_s is None and stop is None:
        raise ValueError("give requests_per_lane, duration_s or a stop event")
    if rpc in ("verify", "clear") and (traveller_ids is None or len(traveller_ids) != len(images)):
        raise ValueError(f"{rpc} needs one traveller id per image")


def _ask(client: MatcherClient, plan: _Plan, j: int, lane_id: str) -> pb.MatchResponse:
    """One call of the plan's kind for image ``j``, as a lane daemon sends it."""
    probe = pb.Probe(image=plan.images[j])
    if plan.rpc == "identify":
        return client.read("Identify", pb.IdentifyRequest(probe=probe, lane_id=lane_id),
                           plan.timeout)
    if plan.rpc == "verify":
        return client.read("Verify", pb.VerifyRequest(probe=probe, lane_id=lane_id,
                                                      traveller_id=plan.claims[j]),
                           plan.timeout)
    return client.read("Clear", pb.ClearRequest(probe=probe, lane_id=lane_id,
                                                claimed_traveller_id=plan.claims[j]),
                       plan.timeout)


def _lane(plan: _Plan, number: int, client: MatcherClient, start_gate: threading.Barrier,
          run_began: list[float]) -> _Tally:
    """Lane ``number``: wait for the start, then send, wait for the answer, note it, and
    send the next (or wait for its slot, with ``interval_s``) until the plan says stop."""
    lane_id = f"lane-{number:02d}"
    tally = _Tally()
    start_gate.wait()
    began = time.monotonic()
    end = None if plan.duration_s is None else began + plan.duration_s
    interval, stop = plan.interval_s, plan.stop
    sent = 0
    if interval and stop.wait(interval * number / plan.lanes):
        return tally
    while not stop.is_set():
        if plan.requests_per_lane is not None and sent >= plan.requests_per_lane:
            break
        if end is not None and time.monotonic() >= end:
            break
        j = (number + sent) % len(plan.images)
        sent += 1
        t = time.perf_counter()
        sent_at = time.monotonic() - run_began[0]
        try:
            resp = _ask(client, plan, j, lane_id)
        except grpc.RpcError as exc:
            tally.errors[exc.code().name] += 1
            if plan.timeline:
                tally.calls.append((sent_at, (time.perf_counter() - t) * 1e3, exc.code().name))
        else:
            latency_ms = (time.perf_counter() - t) * 1e3
            tally.latencies_ms.append(latency_ms)
            name = pb.Decision.Name(resp.decision)
            tally.decisions[name] += 1
            if plan.timeline:
                tally.calls.append((sent_at, latency_ms, name))
            if plan.on_answer is not None:
                plan.on_answer(name)
        if interval:
            pause = began + interval * (sent + number / plan.lanes) - time.monotonic()
            if pause > 0 and stop.wait(pause):
                break
    return tally


def _run(plan: _Plan, client: MatcherClient) -> LaneReport:
    """Start every lane together, wait for all of them, and add up what they saw."""
    report = LaneReport(plan.lanes, 0.0)
    lock = threading.Lock()
    start_gate = threading.Barrier(plan.lanes + 1)
    run_began = [0.0]  # set just before the lanes are let go; read by each of them

    def lane(number: int) -> None:
        tally = _lane(plan, number, client, start_gate, run_began)
        with lock:
            tally.add_to(report)

    threads = [threading.Thread(target=lane, args=(i,), name=f"lane-{i}", daemon=True)
               for i in range(plan.lanes)]
    for t in threads:
        t.start()
    run_began[0] = time.monotonic()
    start_gate.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - began
    return report


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
    _check_plan(images, rpc, traveller_ids, requests_per_lane, duration_s, stop)
    plan = _Plan(images, lanes, rpc, traveller_ids or (), timeout, stop or threading.Event(),
                 requests_per_lane, duration_s, interval_s, timeline, on_answer)
    own_client = client is None
    if client is None:
        client = MatcherClient(target, token=token, ca=ca, cert=cert, key=key,
                               timeout=timeout, server_name=server_name)
    try:
        return _run(plan, client)
    finally:
        plan.stop.set()
        if own_client:
            client.close()
