"""Reliability suite: the ``--soak`` switch, a tally of cases run, and shared helpers.

``pytest tests/reliability`` is the CI run (bounded, a few minutes on 2 cores);
``pytest tests/reliability --soak`` runs the same tests with many more kills, fuzz
examples and a longer overload, sized by ``--soak-kills``, ``--soak-fuzz`` and
``--soak-overload-s``. The figures (kills survived, fuzz cases per decoder and per RPC with
their outcomes, overload level held) are printed at the end and written as JSON to
``$MATCHER_RELIABILITY_REPORT`` (default ``build/reliability.json``) so the README can
quote a run.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# Fuzz cases of each fuzz test in the CI run. Under --soak the --soak-fuzz total is split
# between them in these proportions (decode fuzzer ~79 %, RPC fuzzer ~21 %).
FUZZ_CI_CASES = {
    "decode.png_chunks": 600, "decode.jpeg_markers": 600, "decode.bombs": 300,
    "decode.isobmff_boxes": 400, "decode.webp_chunks": 400, "decode.magic_random": 600,
    "decode.j2k_markers": 400, "decode.documents": 400,
    "rpc.messages": 700, "rpc.raw_bytes": 60,
}
SOAK_KILLS = 25
SOAK_FUZZ = 10 * sum(FUZZ_CI_CASES.values())   # 44,600
SOAK_OVERLOAD_S = 60.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="reliability suite: many more kills, fuzz cases and overload time")
    parser.addoption("--soak-kills", type=int, default=SOAK_KILLS, metavar="N",
                     help=f"with --soak: SIGKILLs of the crash-safety run (default {SOAK_KILLS})")
    parser.addoption("--soak-fuzz", type=int, default=SOAK_FUZZ, metavar="N",
                     help="with --soak: fuzz cases in total, split across the decode and RPC "
                          f"fuzzers (default {SOAK_FUZZ})")
    parser.addoption("--soak-overload-s", type=float, default=SOAK_OVERLOAD_S, metavar="S",
                     help="with --soak: seconds of 3x overload, per queue configuration "
                          f"(default {SOAK_OVERLOAD_S:.0f})")


class Budget:
    """How much of each loop to run: the CI figure, or the soak figure with --soak."""

    def __init__(self, soak: bool, kills: int = SOAK_KILLS, fuzz: int = SOAK_FUZZ,
                 overload_s: float = SOAK_OVERLOAD_S) -> None:
        if min(kills, fuzz) < 1 or overload_s <= 0:
            raise ValueError(f"soak sizes must be positive, got: kills={kills}, fuzz={fuzz}, "
                             f"overload_s={overload_s}")
        self.soak = soak
        self.soak_kills = kills
        self.soak_fuzz = fuzz
        self.soak_overload_s = overload_s

    def pick(self, ci: int | float, soak: int | float):
        return soak if self.soak else ci

    def kills(self, ci: int) -> int:
        return self.soak_kills if self.soak else ci

    def fuzz(self, name: str) -> int:
        """Fuzz cases for the test ``name`` (a key of FUZZ_CI_CASES): its CI figure, or its
        share of --soak-fuzz."""
        ci = FUZZ_CI_CASES[name]
        if not self.soak:
            return ci
        return max(1, round(self.soak_fuzz * ci / sum(FUZZ_CI_CASES.values())))

    def overload_s(self, ci: float) -> float:
        return self.soak_overload_s if self.soak else ci


class Tally:
    """Counts and figures gathered across the session (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.figures: dict[str, object] = {}
        self.outcomes: dict[str, dict[str, dict[str, int]]] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def outcome(self, group: str, key: str, outcome: str) -> None:
        """Count one case of ``group`` (e.g. "fuzz.decode") by ``key`` (the decoder or RPC)
        and its ``outcome`` (a status code or exception class)."""
        with self._lock:
            by_outcome = self.outcomes.setdefault(group, {}).setdefault(key, {})
            by_outcome[outcome] = by_outcome.get(outcome, 0) + 1

    def figure(self, name: str, value: object) -> None:
        with self._lock:
            self.figures[name] = value


TALLY = Tally()


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> Budget:
    config = request.config
    return Budget(bool(config.getoption("--soak", default=False)),
                  kills=config.getoption("--soak-kills"), fuzz=config.getoption("--soak-fuzz"),
                  overload_s=config.getoption("--soak-overload-s"))


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def _report_path() -> Path:
    override = os.environ.get("MATCHER_RELIABILITY_REPORT")
    return Path(override) if override else REPO / "build" / "reliability.json"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not TALLY.counts and not TALLY.figures and not TALLY.outcomes:
        return
    fuzz_total = sum(v for k, v in TALLY.counts.items() if k.startswith("fuzz."))
    tr = terminalreporter
    tr.section("reliability figures")
    tr.write_line(f"fuzz cases run: {fuzz_total}")
    for name in sorted(TALLY.counts):
        tr.write_line(f"  {name}: {TALLY.counts[name]}")
    for group in sorted(TALLY.outcomes):
        for key, by_outcome in sorted(TALLY.outcomes[group].items()):
            cases = sum(by_outcome.values())
            tr.write_line(f"{group} {key}: {cases} cases {dict(sorted(by_outcome.items()))}")
    for name in sorted(TALLY.figures):
        tr.write_line(f"{name}: {TALLY.figures[name]}")
    path = _report_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "soak": bool(config.getoption("--soak", default=False)),
            "soak_sizes": {"kills": config.getoption("--soak-kills"),
                           "fuzz": config.getoption("--soak-fuzz"),
                           "overload_s": config.getoption("--soak-overload-s")},
            "exit_status": int(exitstatus),
            "fuzz_cases_total": fuzz_total,
            "counts": TALLY.counts,
            "figures": TALLY.figures,
            "outcomes": TALLY.outcomes,
        }, indent=2, sort_keys=True) + "\n")
        tr.write_line(f"written to {path}")
    except OSError as exc:
        tr.write_line(f"could not write {path}: {exc}")
