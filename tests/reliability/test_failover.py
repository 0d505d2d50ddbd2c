"""Lanes keep clearing when a server dies, stalls, drains or goes stale (issue 19).

Real ``matcher serve`` processes on fixed loopback ports (a writer with the demo gallery
and read replicas of its snapshots), real signals, paced lanes through one MatcherClient
given every address. The CI run asserts correctness only: no lane call fails, every
answer is the right one, nothing acknowledged is lost. ``--soak`` runs longer (four
kill/stall rounds, three rolling restarts) and holds the kill/stall scenario's lane p99
to the issue's 1,000 ms.
"""
from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from _cluster import Cluster, Fault, run_with_faults
from grpc_health.v1 import health_pb2

from matcher.client import MatcherClient, WriterUnavailable, make_probe
from matcher.face.models import demo_photo
from matcher.transport import LANE_HEALTH_SERVICE
from matcher.v1 import matcher_pb2 as pb

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
P99_BUDGET_MS = 1000.0


@pytest.fixture(scope="module")
def probe() -> bytes:
    return demo_photo("yaoming.jpg").read_bytes()


def _answers_right(run, tally, name: str) -> None:
    """No lane call failed, every answer the demo player yaoming.jpg is."""
    report = run.report
    tally.figure(f"failover.{name}", {
        "calls": report.answered + report.failed, "failed": report.failed,
        "errors": dict(report.errors), "p50_ms": round(report.percentile(50), 1),
        "p99_ms": round(report.percentile(99), 1), "hedges": run.hedges,
        "faults": [(f.label, round(f.at_s, 1), round(f.done_s or -1, 1)) for f in run.faults]})
    assert not run.errors, run.errors
    assert report.failed == 0, (f"{report.failed} of {report.answered + report.failed} lane "
                                f"calls failed: {dict(report.errors)}")
    assert report.answered > 0
    assert set(report.decisions) == {"MATCH"}, report.decisions


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _decisions(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                   if line.startswith("matcher_decisions_total{"))


def _wait(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` (a state change in another process) until true or ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _lane_health(address: str) -> int:
    with MatcherClient(address, timeout=5) as client:
        return client.health(LANE_HEALTH_SERVICE)


def test_a_killed_and_a_stalled_replica_cost_the_lanes_nothing(tmp_path, probe, budget,
                                                               tally):
    """The issue's scenario: 16 lanes, one Identify every 0.5 s each with a 2 s deadline;
    one replica SIGKILLed, later the other SIGSTOPped for 5 s and resumed."""
    with Cluster(tmp_path) as cluster:
        r1, r2 = cluster.replicas
        cycles = budget.pick(1, 4)
        faults = []
        for c in range(cycles):
            t0 = 16.0 * c
            faults += [Fault(t0 + 4, "SIGKILL replica1",
                             lambda: cluster.signal(r1, signal.SIGKILL)),
                       Fault(t0 + 8, "SIGSTOP replica2",
                             lambda: cluster.signal(r2, signal.SIGSTOP)),
                       Fault(t0 + 13, "SIGCONT replica2",
                             lambda: cluster.signal(r2, signal.SIGCONT))]
            if c + 1 < cycles:  # bring replica1 back for the next round
                faults.append(Fault(t0 + 13.5, "restart replica1",
                                    lambda: cluster.restart(r1, how="kill")))
        run = run_with_faults(cluster.addresses, [probe], faults, duration_s=16.0 * cycles)
        _answers_right(run, tally, "kill_and_stall")
        if budget.soak:
            p99 = run.report.percentile(99)
            assert p99 <= P99_BUDGET_MS, f"lane p99 {p99:.0f} ms over {P99_BUDGET_MS:.0f} ms"
        # The stalled replica is back in rotation once it answers its health check.
        assert r2.alive()
        assert _lane_health(r2.address) == SERVING


def test_a_drain_and_a_full_rolling_restart_fail_no_lane_call(tmp_path, probe, budget, tally):
    """Every server in turn: SIGTERM (drain), start again on its port, SERVING, then 3 s
    for the clients to reconnect before the next (the runbook's order)."""
    with Cluster(tmp_path) as cluster:
        faults = []
        for _ in range(budget.pick(1, 3)):
            for member in cluster.members:
                faults.append(Fault(3.0, f"restart {member.name}",
                                    lambda m=member: (cluster.restart(m), time.sleep(3.0))))
        run = run_with_faults(cluster.addresses, [probe], faults, tail_s=2.0,
                              duration_s=budget.pick(240.0, 600.0))
        for fault in faults:
            assert fault.done_s is not None and fault.done_s < run.report.seconds, \
                f"{fault.label} did not finish while the lanes ran"
        # No latency bound even under --soak: each restarted server loads its models on
        # the same two cores the lanes use (the benchmark reports the figure).
        _answers_right(run, tally, "rolling_restart")
        for member in cluster.members:
            log = member.process.log_path.read_text(errors="replace")
            assert "draining: health NOT_SERVING" in log and "drained and stopped" in log, \
                member.name


def _templates(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_stale_replicas_step_aside_unless_last_standing_and_writes_name_the_writer(
        tmp_path, probe, tally):
    """replica1 steps aside 4 s after its newest snapshot (--max-snapshot-age 4);
    replica2 never does. A publisher keeps snapshots fresh while the writer lives."""
    with Cluster(tmp_path, replica_args=[["--max-snapshot-age", "4"], []]) as cluster:
        stale, fresh = cluster.replicas
        writer = cluster.writer
        stop = threading.Event()

        def publish_every_second() -> None:
            with MatcherClient(writer.address, timeout=10, hedge=None) as client:
                while not stop.wait(1.0):
                    try:
                        client.publish_snapshot(timeout=10)
                    except grpc.RpcError:
                        pass  # the writer is down: that is the test

        publisher = threading.Thread(target=publish_every_second, daemon=True)
        publisher.start()
        try:
            _wait(lambda: _lane_health(stale.address) == SERVING, 30, "replica1 fresh")
            acknowledged = {}
            with MatcherClient(cluster.addresses, writer=writer.address, timeout=10) as client:
                for i, t in enumerate(_templates(5, seed=19)):
                    resp = client.enroll(f"T-{i}", [make_probe(template=t)])
                    acknowledged[f"T-{i}"] = resp.gallery_version

                # The writer dies: no more snapshots; replica1 goes stale and steps aside.
                writer.process.kill()
                _wait(lambda: _lane_health(stale.address) == NOT_SERVING, 30,
                      "replica1 NOT_SERVING for lanes")
                assert client.health() == SERVING       # still answers if asked
                assert _metric(stale.metrics_port, "matcher_replica_stale") == 1
                assert _metric(stale.metrics_port, "matcher_lane_serving") == 0
                assert _metric(fresh.metrics_port, "matcher_replica_stale") == 0
                assert stale.process.wait_for_output(b"replica stale: snapshot", 5)

                # Lanes go to the fresh replica only.
                before = _decisions(stale.metrics_port)
                for _ in range(12):
                    assert client.identify(probe).decision == pb.MATCH
                assert _decisions(stale.metrics_port) == before

                # Writes while the writer is down: UNAVAILABLE naming the writer.
                with pytest.raises(WriterUnavailable) as refused:
                    client.enroll("T-late", [make_probe(template=_templates(1, seed=7)[0])])
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert writer.address in refused.value.details()

                # The fresh replica goes too: the stale one is the last one standing.
                fresh.process.stop()
                for _ in range(12):
                    assert client.identify(probe).decision == pb.MATCH
                assert _decisions(stale.metrics_port) >= before + 12

                # The writer's restart brings back every acknowledged write.
                writer.process.start()
                with MatcherClient(writer.address, timeout=10) as to_writer:
                    for traveller_id in acknowledged:
                        assert to_writer.get_traveller(traveller_id).templates == 1
                    assert to_writer.gallery_info().gallery_version >= max(acknowledged.values())
                    assert to_writer.gallery_info().role == "writer"
                _wait(lambda: _lane_health(stale.address) == SERVING, 30,
                      "replica1 fresh again after the writer's restart")
                assert stale.process.wait_for_output(b"replica fresh again", 5)
                tally.figure("failover.stale_replica", {"acknowledged": len(acknowledged),
                                                        "lost": 0})
        finally:
            stop.set()
            publisher.join(15)
