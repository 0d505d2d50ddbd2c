"""``python -m benchmarks [--quick] [--only NAME[,NAME]] --out DIR``: run the suites."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .harness import Report, machine_info, write_summary

SUITES = ("accuracy", "pipeline", "kernels", "search", "service", "reindex", "failover")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="matcher bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats; finishes in minutes (CI)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {SUITES}")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--lfw", type=Path, default=None, metavar="DIR",
                        help="lfw-dev folder for the accuracy suite (default: "
                             "../shared/data/lfw-dev beside the checkout, or $MATCHER_LFW_DIR)")
    args = parser.parse_args(argv)
    if args.lfw is not None:  # _faces.lfw_dir() reads it, as the tests' override does
        os.environ["MATCHER_LFW_DIR"] = str(args.lfw)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    wanted = [s for s in args.only.split(",") if s] or list(SUITES)
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {SUITES}")
    machine = machine_info()
    reports, docs, errors = [], [], {}
    for name in wanted:
        try:
            module = importlib.import_module(f"benchmarks.suite_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"benchmarks.suite_{name}":
                print(f"[bench] suite {name}: not present, skipped", flush=True)
                continue
            raise
        report = Report(name, args.quick)
        print(f"[bench] suite {name} ...", flush=True)
        started = time.perf_counter()
        try:
            module.run(report, args.quick)
        except Exception as exc:  # a crashing suite fails the run but not the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        docs.append(report.save(args.out, machine, elapsed))
        reports.append(report)
        wrong = [c for c in report.failed if c.kind != "ratio_floor"]
        status = "FAILED" if (wrong or name in errors) else "ok"
        print(f"[bench] suite {name}: {status} in {elapsed:.1f} s", flush=True)
        for c in report.failed:
            what = "below its speed floor" if c.kind == "ratio_floor" else "check failed"
            print(f"[bench]   {what}: {c.name}: {c.detail}", flush=True)
    command = "matcher bench " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = write_summary(args.out, docs, command, errors)
    print(f"[bench] summary: {summary}", flush=True)
    # Only a crash or a wrong answer fails the run: a ratio below its floor is reported (in
    # the output and summary.md), since a busy machine can push any same-run ratio down.
    failed = errors or any(c.kind != "ratio_floor" for r in reports for c in r.failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
