"""Lanes through faults: what a lane sees when a server dies, stalls or is restarted.

A writer (demo gallery) and two read replicas as real ``matcher serve`` processes on
loopback ports; 16 lanes, each sending one Identify (yaoming.jpg) every 0.5 s with a 2 s
deadline through one MatcherClient given the three addresses (issue 19's scenario). On one
timeline, each fault opening a phase:

  steady          all three up
  one killed      replica1 SIGKILLed (stays dead)
  one stalled     replica2 SIGSTOPped (a paused VM, a long GC pause) ...
  recovered       ... SIGCONTed 5 s later; replica1 started again
  rolling restart writer, replica1, replica2 in turn: SIGTERM (drain), start on the same
                  port, SERVING, 3 s for clients to reconnect, the next

Figures per phase: lane calls, failed calls, p50 and p99 latency; and over the fault
scenario (the first four phases) and the rolling restart. The correctness check is the
issue's: no lane call fails. p99 within 1,000 ms over the fault scenario is reported as
a floor (a busy machine can push it up). Quick: 4 s per fault phase (the issue's timing);
full: 15 s. The plot is latency over time with every fault marked.
"""
from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import Report

REPO = Path(__file__).resolve().parents[1]
# The cluster and fault schedule are the failover test's (tests/reliability/_cluster.py,
# which imports tests/service_helpers.py).
sys.path[:0] = [str(REPO / "tests" / "reliability"), str(REPO / "tests")]

from _cluster import Cluster, Fault, run_with_faults  # noqa: E402

from matcher.face.models import demo_photo  # noqa: E402

LANES, INTERVAL_S, DEADLINE_S = 16, 0.5, 2.0
P99_TARGET_MS = 1000.0
PHASES = ("steady", "one killed", "one stalled", "recovered", "rolling restart")


def _phase_figures(report: Report, name: str, calls: list[tuple[float, float, str]]
                   ) -> dict:
    key = name.replace(" ", "_")
    answered = [lat for _, lat, outcome in calls if outcome == "MATCH"]
    failed = sum(1 for _, _, outcome in calls if outcome not in ("MATCH",))
    report.figure(f"{key}_calls", len(calls), "calls")
    report.figure(f"{key}_failed", failed, "calls", summary=True)
    if answered:
        report.figure(f"{key}_p50_ms", float(np.percentile(answered, 50)), "ms")
        report.figure(f"{key}_p99_ms", float(np.percentile(answered, 99)), "ms", summary=True)
    return {"calls": len(calls), "failed": failed}


def run(report: Report, quick: bool) -> None:
    phase_s = 4.0 if quick else 15.0
    report.param(lanes=LANES, interval_s=INTERVAL_S, deadline_s=DEADLINE_S,
                 phase_s=phase_s, servers="writer + 2 replicas", probe="yaoming.jpg")
    image = demo_photo("yaoming.jpg").read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp, \
            Cluster(Path(tmp)) as cluster:
        writer, r1, r2 = cluster.members
        t_kill, t_stop = phase_s, 2 * phase_s
        t_cont = t_stop + 5.0   # the 5 s stall
        t_rolling = t_cont + phase_s
        faults = [
            Fault(t_kill, "SIGKILL replica1", lambda: cluster.signal(r1, signal.SIGKILL)),
            Fault(t_stop, "SIGSTOP replica2", lambda: cluster.signal(r2, signal.SIGSTOP)),
            Fault(t_cont, "SIGCONT replica2", lambda: cluster.signal(r2, signal.SIGCONT)),
            Fault(t_cont + 0.5, "start replica1", lambda: cluster.restart(r1, how="kill")),
        ]
        for member in (writer, r1, r2):
            faults.append(Fault(t_rolling, f"restart {member.name}",
                                lambda m=member: (cluster.restart(m), time.sleep(3.0))))
        began = time.monotonic()
        run_ = run_with_faults(cluster.addresses, [image], faults, lanes=LANES,
                               interval_s=INTERVAL_S, deadline_s=DEADLINE_S,
                               duration_s=t_rolling + 300.0, tail_s=2.0)
        elapsed = time.monotonic() - began
    if run_.errors:
        raise RuntimeError(f"a fault could not be applied: {run_.errors}")
    timeline = sorted(run_.report.timeline)
    # Restarts start when the one before has finished: the rolling phase opens at the
    # first restart's scheduled time.
    starts = [0.0, t_kill, t_stop, t_cont, t_rolling, float("inf")]
    by_phase = {name: [c for c in timeline if starts[i] <= c[0] < starts[i + 1]]
                for i, name in enumerate(PHASES)}
    outcome = {name: _phase_figures(report, name, calls) for name, calls in by_phase.items()}
    scenario = [c for c in timeline if c[0] < t_rolling]
    scenario_ok = [lat for _, lat, o in scenario if o == "MATCH"]
    report.figure("scenario_calls", len(scenario), "calls")
    report.figure("scenario_failed", len(scenario) - len(scenario_ok), "calls", summary=True)
    p99 = float(np.percentile(scenario_ok, 99)) if scenario_ok else float("nan")
    report.figure("scenario_p99_ms", p99, "ms", summary=True,
                  note="steady + one killed + one stalled + recovered")
    report.figure("rolling_restart_failed", outcome["rolling restart"]["failed"], "calls",
                  summary=True)
    report.figure("hedges", run_.hedges, "hedges",
                  note=f"of {len(timeline)} lane calls (each hedge: 2 extra attempts)")
    report.figure("run_s", elapsed, "s")
    errors = {o: sum(1 for _, _, x in timeline if x == o) for o in {x for _, _, x in timeline}}
    report.param(outcomes=errors, faults=[(f.label, round(f.at_s, 1),
                                           round(f.done_s or -1, 1)) for f in faults])
    failed = sum(v["failed"] for v in outcome.values())
    report.check("no lane call failed through kill, stall and rolling restart", failed == 0,
                 f"{failed} of {len(timeline)} failed: "
                 + ", ".join(f"{k} {v['failed']}/{v['calls']}" for k, v in outcome.items()))
    report.check("every server was restarted while the lanes ran",
                 all(f.done_s is not None and f.done_s < run_.report.seconds
                     for f in faults), str(report.params["faults"]))
    report.ratio_floor("scenario p99 within 1,000 ms (target / p99)",
                       P99_TARGET_MS / p99 if p99 == p99 and p99 > 0 else 0.0, 1.0,
                       f"p99 {p99:.0f} ms")
    _plot(report, timeline, faults, starts)


def _plot(report: Report, timeline, faults, starts) -> None:
    fig, ax = report.plot(figsize=(11, 5))
    ok = [(t, lat) for t, lat, o in timeline if o == "MATCH"]
    bad = [(t, lat) for t, lat, o in timeline if o != "MATCH"]
    if ok:
        ax.scatter(*zip(*ok, strict=True), s=6, alpha=0.5, label="answered")
    if bad:
        ax.scatter(*zip(*bad, strict=True), s=40, marker="x", color="red", label="failed")
    for i, name in enumerate(PHASES):
        end = starts[i + 1] if starts[i + 1] != float("inf") else (
            max(t for t, _, _ in timeline) if timeline else starts[i])
        if i % 2:
            ax.axvspan(starts[i], end, color="0.92", zorder=0)
        ax.text((starts[i] + end) / 2, 0.02, name, transform=ax.get_xaxis_transform(),
                ha="center", fontsize=8, color="0.3")
    for fault in faults:
        x = fault.at_s if not fault.label.startswith("restart") else (fault.done_s or 0)
        ax.axvline(x, color="tab:red" if "SIG" in fault.label else "tab:green",
                   lw=0.8, ls="--")
        ax.text(x, 0.97, (fault.label if not fault.label.startswith("restart")
                          else fault.label + " done"), rotation=90, va="top", fontsize=7,
                transform=ax.get_xaxis_transform())
    ax.axhline(DEADLINE_S * 1e3, color="k", lw=0.6)
    ax.axhline(P99_TARGET_MS, color="tab:orange", lw=0.6, ls=":", label="p99 target")
    ax.set_yscale("log")
    ax.set_xlabel("seconds into the run (call sent)")
    ax.set_ylabel("lane latency, ms (deadline 2 s)")
    ax.set_title(f"{LANES} lanes, one Identify every {INTERVAL_S} s each; writer + 2 replicas")
    ax.legend(loc="upper left", fontsize=8)
