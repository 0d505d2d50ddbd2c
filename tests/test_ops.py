"""The operations kit (ops/prometheus/, ops/grafana/): every metric the alerting rules and the
dashboard use is one a running server exports, with the labels they select on; the rules
pass promtool's checks and unit tests, and a real Prometheus scraping a running server
finds every metric they use. A renamed metric breaks these tests, not a dashboard.

promtool and prometheus come from Debian's ``prometheus`` package (.ci/run installs it
where it can); without them these tests skip with one line.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from service_helpers import ServerThread, server_config

from matcher.client import MatcherClient
from matcher.face.models import demo_photo

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops" / "prometheus"
RULES = OPS / "matcher-alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "matcher-dashboard.json"
# Labels Prometheus adds to every series it scrapes (and a histogram's bucket bound).
SCRAPE_LABELS = {"job", "instance", "le"}
_SELECTOR = re.compile(r"\b(matcher_[a-z_]+)\b(?:\{([^}]*)\})?")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus)")
    return path


def _rule_metrics() -> set[str]:
    """Every matcher_* metric name the alerting rules query (histogram suffix removed)."""
    names = set(re.findall(r"\b(matcher_[a-z_]+)\b", RULES.read_text()))
    return {re.sub(r"_bucket$", "", n) for n in names}


def _rule_exprs() -> list[str]:
    """Each alert's expression (the text from its ``expr:`` to its ``for:`` or labels)."""
    rules = RULES.read_text().split("- alert:")[1:]
    return [rule.split("expr:", 1)[1].split("labels:", 1)[0] for rule in rules]


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pipeline) -> dict[str, set[str]]:
    """Sample name -> label names, read from a running server's /metrics after it has
    answered a lane's call (labelled counters have series only once counted)."""
    from prometheus_client.parser import text_string_to_metric_families

    config = server_config(tmp_path_factory.mktemp("ops"))
    with ServerThread(config, pipeline) as srv:
        with MatcherClient(srv.address, timeout=30, lane_id="K-01") as client:
            client.identify(demo_photo("yaoming.jpg").read_bytes())
        port = srv.running.metrics_server.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.mark.parametrize("source, exprs", [("alert rules", _rule_exprs()),
                                           ("dashboard", _dashboard_exprs())])
def test_every_metric_the_rules_and_dashboard_use_is_on_a_running_server(source, exprs,
                                                                          exported):
    assert exprs, f"no expressions read from the {source}"
    problems = []
    for expr in exprs:
        used: set[str] = set()
        for metric, selector in _SELECTOR.findall(expr):
            if metric not in exported:
                problems.append(f"{metric}: not exported")
                continue
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            used |= exported[metric]
            problems += [f"{metric}: no label {label}"
                         for label in sorted(labels - exported[metric] - SCRAPE_LABELS)]
        for grouping in _GROUPING.findall(expr):
            labels = {label.strip() for label in grouping.split(",") if label.strip()}
            problems += [f"grouped by {label}, which no metric of {expr.strip()!r} has"
                         for label in sorted(labels - used - SCRAPE_LABELS)]
    assert not problems, f"the {source} use what a running server does not export: {problems}"


def test_the_dashboard_covers_what_an_operator_watches():
    """Decisions per outcome and lane, latency percentiles, queue and shedding, replica
    snapshot age, disk headroom, audit failures (issue 27), each from its own metric."""
    text = " ".join(_dashboard_exprs())
    for needed in ("matcher_decisions_total", "matcher_lane_decisions_total",
                   "histogram_quantile(0.99", "matcher_stage_seconds_bucket",
                   "matcher_queue_depth", 'reason="overload"', "matcher_snapshot_age_seconds",
                   "matcher_data_disk_free_bytes", "matcher_audit_write_failures_total"):
        assert needed in text, needed
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Imported into any Grafana: the data source is a variable, never one site's uid.
    assert all(t["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"]
               for t in panel.get("targets", []))


def test_alert_rules_pass_promtool_check():
    promtool = _tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([promtool, "check", "config", str(OPS / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60, cwd=OPS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_in_promtool_unit_tests():
    promtool = _tool("promtool")
    done = subprocess.run([promtool, "test", "rules", "matcher-alerts.test.yml"],
                          capture_output=True, text=True, timeout=120, cwd=OPS)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (OPS / "matcher-alerts.test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


@pytest.mark.slow
def test_a_real_prometheus_scrapes_a_running_server_and_loads_the_rules(tmp_path, pipeline):
    prometheus = _tool("prometheus")
    config = server_config(tmp_path / "data", demo=True)
    with ServerThread(config, pipeline) as srv:
        with MatcherClient(srv.address, timeout=30) as client:
            client.identify(demo_photo("yaoming.jpg").read_bytes())  # a decision to count
        metrics_port = srv.running.metrics_server.port
        web_port = _free_port()
        shutil.copy(RULES, tmp_path / RULES.name)
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES.name}]\n"
            "scrape_configs:\n"
            "  - job_name: matcher\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
        try:
            deadline = time.monotonic() + 60
            while True:  # until Prometheus answers and has scraped the server once
                try:
                    if [r for r in _query(web_port, 'up{job="matcher"} == 1')]:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"Prometheus did not scrape the server in 60 s:\n{log}")
                time.sleep(0.5)
            missing = [name for name in sorted(_rule_metrics())
                       if not _query(web_port, f'{{__name__=~"{name}(_bucket|_total)?"}}')]
            assert not missing, f"scraped, but not found: {missing}"
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/rules",
                                        timeout=10) as r:
                groups = json.loads(r.read())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            assert len(rules) == len(re.findall(r"- alert:", RULES.read_text()))
            assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
            # Prometheus parses and runs every dashboard query (Grafana's variables given
            # the values it would substitute); a bad one answers HTTP 400.
            for expr in _dashboard_exprs():
                query = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
                if query.startswith("label_values("):  # Grafana's own function
                    query = query[len("label_values("):].rsplit(",", 1)[0]
                _query(web_port, query)
        finally:
            proc.terminate()
            proc.wait(30)
