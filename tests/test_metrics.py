"""Metrics: recorded values come back out of a real /metrics endpoint on loopback."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from matcher.service.metrics import (
    MAX_LANES,
    MAX_RPC_NAMES,
    NO_LANE,
    OTHER_LANE,
    OTHER_RPC,
    STAGES,
    Metrics,
    start_metrics_server,
)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics and index every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture()
def served():
    metrics = Metrics()
    server = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        yield metrics, server.port
    finally:
        server.close()


def test_scrape_returns_recorded_values(served):
    metrics, port = served
    metrics.observe_stage("embed", 0.012)
    metrics.observe_stage("embed", 0.030)
    metrics.observe_stage("total", 0.180)
    metrics.observe_batch(4)
    metrics.set_queue_depth(7)
    metrics.count_decision("Verify", "MATCH")
    metrics.count_decision("Verify", "MATCH")
    metrics.count_decision("Identify", "NO_FACE")
    metrics.count_rejected("overload")
    metrics.set_gallery(1234, 17)
    metrics.set_model_info("buffalo_l", detector="det_10g")

    s = _scrape(port)
    assert s[("matcher_stage_seconds_count", (("stage", "embed"),))] == 2
    assert s[("matcher_stage_seconds_sum", (("stage", "embed"),))] == pytest.approx(0.042)
    # 12 ms lands in the 15 ms bucket but not the 10 ms one.
    assert s[("matcher_stage_seconds_bucket", (("le", "0.01"), ("stage", "embed")))] == 0
    assert s[("matcher_stage_seconds_bucket", (("le", "0.015"), ("stage", "embed")))] == 1
    assert s[("matcher_stage_seconds_count", (("stage", "total"),))] == 1
    for stage in STAGES:  # every stage is exposed even before it is observed
        assert ("matcher_stage_seconds_count", (("stage", stage),)) in s
    assert s[("matcher_batch_size_count", ())] == 1
    assert s[("matcher_batch_size_sum", ())] == 4
    assert s[("matcher_queue_depth", ())] == 7
    assert s[("matcher_decisions_total", (("decision", "MATCH"), ("rpc", "Verify")))] == 2
    assert s[("matcher_decisions_total", (("decision", "NO_FACE"), ("rpc", "Identify")))] == 1
    assert s[("matcher_requests_rejected_total", (("reason", "overload"),))] == 1
    assert s[("matcher_requests_rejected_total", (("reason", "deadline"),))] == 0
    assert s[("matcher_gallery_size", ())] == 1234
    assert s[("matcher_gallery_version", ())] == 17
    assert s[("matcher_model_info", (("detector", "det_10g"), ("model_id", "buffalo_l")))] == 1


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.count_rejected("deadline")
    assert b"requests_rejected_total{reason=\"deadline\"} 1.0" in a.render()
    assert b"requests_rejected_total{reason=\"deadline\"} 0.0" in b.render()


def test_two_servers_serve_their_own_registry():
    a, b = Metrics(), Metrics()
    sa, sb = start_metrics_server(a, "127.0.0.1", 0), start_metrics_server(b, "127.0.0.1", 0)
    try:
        a.set_queue_depth(3)
        b.set_queue_depth(9)
        assert _scrape(sa.port)[("matcher_queue_depth", ())] == 3
        assert _scrape(sb.port)[("matcher_queue_depth", ())] == 9
    finally:
        sa.close()
        sb.close()


@pytest.mark.parametrize("call", [
    lambda m: m.observe_stage("traveller-42", 0.01),
    lambda m: m.count_decision("Verify", "maybe"),
    lambda m: m.count_rejected("because"),
    lambda m: m.observe_batch(0),
    lambda m: m.set_gallery(10, "snapshot of T-123"),
])
def test_labels_outside_the_closed_sets_are_refused(call):
    with pytest.raises(ValueError):
        call(Metrics())


def test_rpc_label_cardinality_is_capped():
    metrics = Metrics()
    for i in range(MAX_RPC_NAMES + 20):
        metrics.count_decision(f"Rpc{i}", "MATCH")
    metrics.count_decision("not a method name / T-123", "ERROR")
    rpcs = {
        s.labels["rpc"]
        for family in text_string_to_metric_families(metrics.render().decode())
        if family.name == "matcher_decisions"
        for s in family.samples
    }
    assert len(rpcs) == MAX_RPC_NAMES + 1
    assert OTHER_RPC in rpcs




def test_decisions_are_counted_per_lane_with_the_lane_label_capped():
    metrics = Metrics()
    for i in range(MAX_LANES + 10):
        metrics.count_decision("Identify", "MATCH", f"K-{i:02d}")
    metrics.count_decision("Verify", "NO_MATCH", "K-00")
    metrics.count_decision("Verify", "NO_MATCH", "lane with\nnewline T-123")
    metrics.count_decision("Clear", "MATCH", "")
    samples = [s for family in text_string_to_metric_families(metrics.render().decode())
               if family.name == "matcher_lane_decisions" for s in family.samples
               if s.name.endswith("_total")]
    counts = {(s.labels["lane"], s.labels["decision"]): s.value for s in samples}
    assert counts[("K-00", "MATCH")] == 1 and counts[("K-00", "NO_MATCH")] == 1
    assert counts[(OTHER_LANE, "MATCH")] == 10 and counts[(OTHER_LANE, "NO_MATCH")] == 1
    assert counts[(NO_LANE, "MATCH")] == 1
    assert len({lane for lane, _ in counts}) == MAX_LANES + 2
