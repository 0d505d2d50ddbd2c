"""The README a newcomer reads: every module named, every linked file present."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def layout_tree() -> set[str]:
    """The .py paths the README's "Layout" tree names, rebuilt from its indentation."""
    section = README.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[:depth] + [name.rstrip("/")]
        if name.endswith(".py"):
            paths.add("/".join(stack))
    return paths


def test_the_layout_tree_is_the_package() -> None:
    """Every module is in the README's tree, where it lives, and the tree names no other."""
    package = REPO / "matcher"
    modules = {str(p.relative_to(REPO)) for p in package.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and "v1" not in p.parts}
    tree = layout_tree()
    assert sorted(modules - tree) == [], "modules the README's tree does not show"
    assert sorted(tree - modules) == [], "the README's tree shows modules that do not exist"


def test_every_relative_link_and_image_exists() -> None:
    targets = re.findall(r"\]\(([^)#:]+)\)", README)
    assert "docs/perf/latest.md" in targets
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_audit_log_operators_are_told_to_verify_is_the_one_the_server_writes() -> None:
    from matcher.service.audit import AUDIT_FILE

    for doc in (README, (REPO / "docs" / "security.md").read_text()):
        named = re.findall(r"matcher audit +verify +(\S+)", doc)
        assert named and {Path(p).name for p in named} == {AUDIT_FILE}
