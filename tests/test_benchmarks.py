"""The quick benchmark run, as CI runs it: every suite runs to the end, every correctness
check holds, and each suite leaves its JSON + PNG behind. Speed is reported, never asserted
here: a ratio below its floor is printed, since a busy machine can push any ratio down."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_pass_their_checks(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"a suite crashed or a correctness check failed:\n{summary}"
    reports = sorted(out.glob("*.json"))
    assert reports, "no suite ran"
    for path in reports:
        doc = json.loads(path.read_text())
        assert doc["figures"], f"{path.name} recorded no figures"
        assert (out / f"{doc['suite']}.png").exists(), f"{doc['suite']} drew no plot"
        wrong = [c for c in doc["checks"] if not c["ok"] and c["kind"] != "ratio_floor"]
        assert not wrong, f"{doc['suite']}: {wrong}"
    slow = [line for line in summary.splitlines() if "| below floor |" in line]
    if slow:
        print("speed below floor (reported, not failed):", *slow, sep="\n")


def test_matcher_bench_command_passes_its_options_to_the_harness(tmp_path: Path) -> None:
    out = tmp_path / "acc"
    proc = subprocess.run([sys.executable, "-m", "matcher.cli", "bench", "--quick",
                           "--only", "accuracy", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "accuracy.json").exists() and (out / "summary.md").exists()


def test_the_binomial_tail_and_interval_agree_with_the_closed_forms() -> None:
    """benchmarks/_binomial.py, the one home of the accuracy suites' exact binomial figures:
    the tail equals the textbook sum, and each Clopper-Pearson bound is where that tail
    (or its mirror) reaches half the miss rate."""
    import math

    from benchmarks._binomial import binomial_cdf, binomial_tail, clopper_pearson

    def textbook_tail(k: int, n: int, p: float) -> float:
        return 1.0 - sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k))

    for k, n, p in [(0, 10, 0.3), (1, 1_500, 1e-3), (4, 1_500, 1e-3), (7, 40, 0.2)]:
        assert binomial_tail(k, n, p) == pytest.approx(textbook_tail(k, n, p), abs=1e-12)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-12))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-12), 1.0)
    lower, upper = clopper_pearson(3, 1_000)
    assert binomial_tail(3, 1_000, lower) == pytest.approx(0.025, abs=1e-9)
    assert binomial_cdf(3, 1_000, upper) == pytest.approx(0.025, abs=1e-9)


def test_a_figure_its_data_does_not_resolve_stays_out_of_the_summary(tmp_path: Path) -> None:
    """An FNIR at an FPIR that lets one or two non-mated probes pass is recorded with its
    note, marked, and left out of the summary table and the published perf page's headline
    rows, where it would read as a measured miss rate."""
    import importlib.util

    from benchmarks.harness import Report, machine_info, write_summary

    report = Report("accuracy", quick=True)
    report.figure("fnir_at_fpir_0.01", 0.021, "rate", summary=True, note="15.4 may pass")
    report.figure("fnir_at_fpir_0.001", 0.855, "rate", summary=True, resolved=False,
                  note="1.5 may pass (fewer than 5: the interval, not the point)")
    out = tmp_path / "bench"
    doc = report.save(out, machine_info(), 1.0)
    assert doc["summary_keys"] == ["fnir_at_fpir_0.01"]
    saved = json.loads((out / "accuracy.json").read_text())["figures"]["fnir_at_fpir_0.001"]
    assert saved["resolved"] is False and saved["median"] == 0.855 and "1.5" in saved["note"]
    summary = write_summary(out, [doc], "matcher bench", {}).read_text()
    assert "fnir_at_fpir_0.01 |" in summary and "fnir_at_fpir_0.001" not in summary

    spec = importlib.util.spec_from_file_location(
        "update_readme_perf", REPO / "scripts" / "update_readme_perf.py")
    assert spec is not None and spec.loader is not None
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    headline, every = perf.latest_md(out).split("## Every figure")
    assert "fnir_at_fpir_0.001" not in headline
    assert "| fnir_at_fpir_0.001 | 0.855 rate (not resolved) | 1.5 may pass" in every
