"""Merge suite reports of several full runs into one summary.md (+ their PNGs).

    python scripts/merge_bench_runs.py OUT RUN_DIR [RUN_DIR ...]

A full run of every suite at once takes longer than one sitting on a 2-core machine, so
suites are often run one at a time (``matcher bench --only search --out run1``). This
gathers the newest JSON of each suite from the given run folders; each table row keeps
its own run's date and mode.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.__main__ import SUITES  # noqa: E402
from benchmarks.harness import write_summary  # noqa: E402


def main(argv: list[str]) -> int:
    out, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    newest: dict[str, tuple[dict, Path]] = {}
    for run in runs:
        for path in run.glob("*.json"):
            doc = json.loads(path.read_text())
            name = doc.get("suite")
            if name in SUITES and (name not in newest or doc["machine"]["date_utc"]
                                   > newest[name][0]["machine"]["date_utc"]):
                newest[name] = (doc, path)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for name in SUITES:
        if name in newest:
            doc, path = newest[name]
            docs.append(doc)
            shutil.copy2(path, out / path.name)
            png = path.with_suffix(".png")
            if png.exists():
                shutil.copy2(png, out / png.name)
    command = "python scripts/merge_bench_runs.py " + " ".join(argv)
    print(write_summary(out, docs, command, {}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
