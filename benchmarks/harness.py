"""The benchmark harness: figures with min/median/max over repeats, checks, JSON + PNG.

A suite is ``benchmarks/suite_<name>.py`` with ``run(report: Report, quick: bool)``. It
records figures (absolute times go with the machine info; comparisons are ratios measured
in the same run), correctness checks and same-run ratio floors, and draws on
``report.plot()``. Only a crash or a failed correctness check fails the run: speed never
does, neither absolute nor a ratio below its floor (that is reported as such), because
this machine is shared and noisy.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PACKAGES = ("numpy", "onnxruntime", "faiss-cpu", "grpcio", "Cython", "ray", "insightface")


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
            number: int = 1) -> list[float]:
    """Seconds per call of ``fn``, one value per repeat (each the mean of ``number`` calls)."""
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        values.append((time.perf_counter() - t) / number)
    return values


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": {},
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    kind: str  # "correctness" or "ratio_floor"


@dataclass
class Report:
    name: str
    quick: bool
    params: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    summary_keys: list[str] = field(default_factory=list)
    _figure: object = None

    def param(self, **kwargs) -> None:
        self.params.update(kwargs)

    def figure(self, key: str, values: float | Sequence[float], unit: str, *,
               summary: bool = False, note: str = "", resolved: bool = True) -> dict:
        """Record one figure; a sequence is summarised as min/median/max over repeats.

        ``resolved=False``: the data cannot support the figure as a point (too few events
        behind it; the note says why): it is kept, marked, and never in the summary table,
        where it would read as a measured rate."""
        vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
        if not vals:
            raise ValueError(f"figure {key!r} has no values")
        entry = {"unit": unit, "min": min(vals), "median": statistics.median(vals),
                 "max": max(vals), "n": len(vals)}
        if note:
            entry["note"] = note
        if not resolved:
            entry["resolved"] = False
        self.figures[key] = entry
        if summary and resolved and key not in self.summary_keys:
            self.summary_keys.append(key)
        return entry

    def times_ms(self, key: str, seconds: Sequence[float], *, summary: bool = False,
                 note: str = "") -> dict:
        return self.figure(key, [s * 1e3 for s in seconds], "ms", summary=summary, note=note)

    def check(self, name: str, ok: bool, detail: str = "", kind: str = "correctness") -> bool:
        self.checks.append(Check(name, bool(ok), detail, kind))
        return bool(ok)

    def ratio_floor(self, name: str, ratio: float, floor: float, detail: str = "") -> bool:
        """A same-run ratio (e.g. native / numpy speed-up) that must stay above ``floor``."""
        return self.check(name, ratio >= floor,
                          f"ratio {ratio:.2f} (floor {floor}) {detail}".strip(), "ratio_floor")

    def plot(self, nrows: int = 1, ncols: int = 1, figsize=(8, 5)):
        """(fig, axes) to draw this suite's picture on; saved as <name>.png."""
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
        self._figure = fig
        return fig, (axes[0][0] if nrows * ncols == 1 else axes)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_doc(self, machine: dict, seconds: float) -> dict:
        """The JSON document of this suite's run."""
        return {
            "suite": self.name, "quick": self.quick, "machine": machine,
            "elapsed_s": round(seconds, 2), "params": self.params, "figures": self.figures,
            "summary_keys": self.summary_keys,
            "checks": [c.__dict__ for c in self.checks],
        }

    def save(self, out_dir: Path, machine: dict, seconds: float) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = self.to_doc(machine, seconds)
        (out_dir / f"{self.name}.json").write_text(json.dumps(doc, indent=2, default=str))
        if self._figure is not None:
            fig = self._figure
            fig.suptitle(f"{self.name} ({'quick' if self.quick else 'full'} run, "
                         f"{machine['cpus']} CPUs, {machine['date_utc'][:10]})", fontsize=10)
            fig.tight_layout()
            fig.savefig(out_dir / f"{self.name}.png", dpi=110)
            plt.close(fig)
        return doc


def format_value(entry: dict) -> str:
    med = entry["median"]
    text = f"{med:.4g}"
    if entry["n"] > 1:
        text += f" ({entry['min']:.3g}-{entry['max']:.3g})"
    # a figure its data does not resolve says so wherever it is printed (Report.figure)
    resolved = "" if entry.get("resolved", True) else " (not resolved)"
    return f"{text} {entry['unit']}{resolved}"


def write_summary(out_dir: Path, docs: list[dict], command: str,
                  errors: dict[str, str]) -> Path:
    """summary.md: one table of every suite's headline figures, then every check.

    ``docs`` are suite JSON documents (``Report.to_doc``), possibly from several runs:
    each suite's line says its own run's date and mode.
    """
    machine = docs[0]["machine"] if docs else machine_info()
    lines = [
        "# Benchmark summary", "",
        f"Command: `{command}`  ",
        f"Machine: {machine['processor']}, {machine['cpus']} CPUs, Python {machine['python']}",
        "",
        "| suite | run | figure | median (min-max) |", "|---|---|---|---|",
    ]
    for d in docs:
        run = f"{'quick' if d['quick'] else 'full'} {d['machine']['date_utc'][:16]}"
        for key in d["summary_keys"]:
            lines.append(f"| {d['suite']} | {run} | {key} | {format_value(d['figures'][key])} |")
    lines += ["", "| suite | check | result | detail |", "|---|---|---|---|"]
    for d in docs:
        for c in d["checks"]:
            detail = str(c["detail"]).replace("|", "/")
            result = ("ok" if c["ok"] else
                      "below floor" if c["kind"] == "ratio_floor" else "FAILED")
            lines.append(f"| {d['suite']} | {c['name']} | {result} | {detail} |")
    for name, err in errors.items():
        lines.append(f"| {name} | suite ran | FAILED | {err} |")
    path = out_dir / "summary.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
