"""``matcher bench``: hands every argument to the benchmark harness (``python -m benchmarks``)."""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run the harness of this source checkout with ``argv`` untouched."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "harness.py").exists():
        print("matcher bench runs from a source checkout (benchmarks/ is not in the wheel)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    from benchmarks.__main__ import main as bench_main

    return bench_main(argv)
