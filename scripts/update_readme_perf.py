"""Copy a full benchmark run's summary.md (and its plots) into the README's Performance section.

    matcher bench --out bench-out && python scripts/update_readme_perf.py bench-out

Replaces the text between the PERF markers in README.md and copies the PNGs the README
shows into docs/perf/, so every figure there comes from one repeatable run.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- PERF:BEGIN -->", "<!-- PERF:END -->"


def main(out_dir: str) -> int:
    out = Path(out_dir)
    summary = (out / "summary.md").read_text().replace("# Benchmark summary\n", "")
    perf = REPO / "docs" / "perf"
    perf.mkdir(parents=True, exist_ok=True)
    images = []
    for png in sorted(out.glob("*.png")):
        shutil.copy2(png, perf / png.name)
        images.append(f"![{png.stem}](docs/perf/{png.name})")
    readme = (REPO / "README.md").read_text()
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = "\n".join([BEGIN, summary.strip(), "", *images, END])
    (REPO / "README.md").write_text(head + block + tail)
    print(f"README performance section updated from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-out"))
