"""The operations kit (ops/prometheus/): the alerting rules pass promtool's checks and unit
tests, and a real Prometheus scraping a running server finds every metric they use.

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
from matcher.service.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops" / "prometheus"
RULES = OPS / "matcher-alerts.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus)")
    return path


def _rule_metrics() -> set[str]:
    """Every matcher_* metric name the alerting rules query (histogram suffix removed)."""
    names = set(re.findall(r"\b(matcher_[a-z_]+)\b", RULES.read_text()))
    return {re.sub(r"_bucket$", "", n) for n in names}


def test_every_metric_the_rules_use_is_one_the_service_exports():
    exported = Metrics().render().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", exported, re.MULTILINE))
    counters = {f + "_total" for f in re.findall(r"^# TYPE (\S+) counter", exported,
                                                 re.MULTILINE)}
    missing = _rule_metrics() - families - counters
    assert not missing, f"rules use metrics the service does not export: {sorted(missing)}"


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
        finally:
            proc.terminate()
            proc.wait(30)
