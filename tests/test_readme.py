"""The README a newcomer reads: every module named, every linked file present."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_module_is_named_in_the_readme() -> None:
    modules = sorted(p.name for p in (REPO / "matcher").glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in README and not (
        m.endswith("_cli.py") and "*_cli.py" in README and m[:-3] in README)]
    assert not missing, f"modules the README does not name: {missing}"


def test_every_relative_link_and_image_exists() -> None:
    targets = re.findall(r"\]\(([^)#:]+)\)", README)
    assert "docs/perf/latest.md" in targets
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
