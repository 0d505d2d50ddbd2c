"""Reliability suite: the ``--soak`` switch, a tally of cases run, and shared helpers.

``pytest tests/reliability`` is the CI run (bounded, a few minutes on 2 cores);
``pytest tests/reliability --soak`` runs the same tests with many more kills, fuzz
examples and a longer overload. The figures (kills survived, fuzz cases, overload level
held) are printed at the end and written as JSON to ``$MATCHER_RELIABILITY_REPORT``
(default ``build/reliability.json``) so the README can quote a run.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="reliability suite: many more kills, fuzz cases and overload time")


class Budget:
    """How much of each loop to run: the CI figure, or the soak figure with --soak."""

    def __init__(self, soak: bool) -> None:
        self.soak = soak

    def pick(self, ci: int | float, soak: int | float):
        return soak if self.soak else ci


class Tally:
    """Counts and figures gathered across the session (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.figures: dict[str, object] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def figure(self, name: str, value: object) -> None:
        with self._lock:
            self.figures[name] = value


TALLY = Tally()


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> Budget:
    return Budget(bool(request.config.getoption("--soak", default=False)))


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def _report_path() -> Path:
    override = os.environ.get("MATCHER_RELIABILITY_REPORT")
    return Path(override) if override else REPO / "build" / "reliability.json"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not TALLY.counts and not TALLY.figures:
        return
    fuzz_total = sum(v for k, v in TALLY.counts.items() if k.startswith("fuzz."))
    tr = terminalreporter
    tr.section("reliability figures")
    tr.write_line(f"fuzz cases run: {fuzz_total}")
    for name in sorted(TALLY.counts):
        tr.write_line(f"  {name}: {TALLY.counts[name]}")
    for name in sorted(TALLY.figures):
        tr.write_line(f"{name}: {TALLY.figures[name]}")
    path = _report_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "soak": bool(config.getoption("--soak", default=False)),
            "exit_status": int(exitstatus),
            "fuzz_cases_total": fuzz_total,
            "counts": TALLY.counts,
            "figures": TALLY.figures,
        }, indent=2, sort_keys=True) + "\n")
        tr.write_line(f"written to {path}")
    except OSError as exc:
        tr.write_line(f"could not write {path}: {exc}")
