"""The package layout is the architecture: who may import whom (issue 12).

Read from the source (every import statement, also those inside functions) and checked at
run time in a fresh interpreter, so a lazy import cannot slip a layer in either.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import matcher

PACKAGE = Path(matcher.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, wherever the statement is."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules_in(*where: str) -> list[Path]:
    paths: list[Path] = []
    for w in where:
        target = PACKAGE / w
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return paths


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        hits = sorted(m for m in imports_of(path)
                      if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[_module_name(path)] = hits
    return bad


def test_the_import_reader_sees_relative_and_nested_imports():
    # the rules below are only as good as this reader
    found = imports_of(PACKAGE / "face" / "pipeline.py")
    assert "matcher.face.models" in found and "matcher.templates" in found
    assert "matcher._native" in found  # ``from .. import _native``
    # imported inside the command function, not at module level
    assert "matcher.service.audit" in imports_of(PACKAGE / "cli" / "audit.py")


@pytest.mark.parametrize("layer, forbidden", [
    ("templates.py", ("matcher.face", "matcher.gallery", "matcher.service", "matcher.reindex",
                      "matcher.cli", "matcher.client", "grpc", "faiss",
                      "onnxruntime")),
    ("errors.py", ("matcher.face", "matcher.gallery", "matcher.service", "matcher.templates")),
    ("face", ("matcher.gallery", "matcher.service", "matcher.reindex", "matcher.cli",
              "matcher.client", "grpc", "faiss")),
    ("gallery", ("matcher.face", "matcher.service", "matcher.reindex", "matcher.cli",
                 "matcher.client", "matcher.v1", "grpc", "onnx", "onnxruntime")),
    ("client.py", ("matcher.service", "matcher.gallery", "matcher.face", "matcher.reindex",
                   "matcher.cli", "faiss", "onnxruntime")),
    ("transport.py", ("matcher.service", "matcher.gallery", "matcher.face")),
    # The matcher-client distribution (clients/python) ships these alone, without numpy.
    ("hedging.py", ("matcher.service", "matcher.gallery", "matcher.face", "matcher.reindex",
                    "matcher.cli", "matcher.lane", "numpy", "faiss", "onnxruntime")),
    ("lane.py", ("matcher.service", "matcher.gallery", "matcher.face", "faiss", "onnxruntime")),
    ("service", ("matcher.reindex", "matcher.cli")),
    # The servicer translates protos and status codes; the maths is the engine's.
    ("service/servicer.py", ("numpy", "faiss", "matcher._native", "matcher._reference",
                             "matcher.templates.check_templates",
                             "matcher.templates.fuse_templates",
                             "matcher.templates.fuse_groups")),
    ("reindex", ("matcher.service", "matcher.cli", "grpc")),
])
def test_layer_imports_nothing_above_it(layer, forbidden):
    assert offending(modules_in(layer), forbidden) == {}


def import_graph(*packages: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports, every import statement counted
    (type-only ones under TYPE_CHECKING and those inside functions too). An imported
    name resolves to the longest module it names (``from .x import y`` is module x)."""
    paths = [p for package in packages for p in sorted(package.rglob("*.py"))]
    known = {_module_name(p) for p in paths}

    def module_of(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for path in paths:
        me = _module_name(path)
        graph[me] = {m for m in map(module_of, imports_of(path)) if m and m != me}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one
    module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"x": {"y"}, "y": {"x"}, "z": set()}) == [["x", "y"]]


def test_no_import_circle_in_matcher_or_benchmarks():
    """A module never imports, even lazily or only for its types, one that imports it
    back: each layer can be read, and loaded, before the ones that use it."""
    assert import_circles(import_graph(PACKAGE, PACKAGE.parent / "benchmarks")) == []


def test_every_benchmarks_module_imports():
    """The benchmarks run for most of an hour and only on demand: a name moved in matcher/
    (a module split, say) fails here, in seconds, not at the end of a run."""
    modules = sorted(p.stem for p in (PACKAGE.parent / "benchmarks").glob("*.py")
                     if p.stem != "__main__")
    statement = "; ".join(f"import benchmarks.{m}" for m in modules)
    done = subprocess.run([sys.executable, "-c", statement], cwd=PACKAGE.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _loaded_after(statement: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{statement}\nimport sys\n"
                          "print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


HEAVY = ("onnxruntime", "onnx", "faiss", "grpc")


@pytest.mark.parametrize("statement, absent", [
    ("import matcher.gallery.store", HEAVY + ("matcher.face",)),
    ("import matcher.gallery.primary, matcher.gallery.decision",
     ("onnxruntime", "onnx", "grpc", "matcher.face", "matcher.service")),
    ("import matcher.client", ("onnxruntime", "onnx", "faiss", "matcher.service",
                               "matcher.gallery", "matcher.face")),
    ("import matcher.face.pipeline", ("faiss", "grpc", "matcher.gallery", "matcher.service")),
])
def test_importing_a_layer_loads_only_what_it_needs(statement, absent):
    loaded = _loaded_after(statement)
    assert sorted(m for m in loaded if m.split(".")[0] in absent or
                  any(m == a or m.startswith(a + ".") for a in absent)) == []


def test_every_module_says_what_it_is():
    """One idea per module, said in its docstring."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "v1" in path.parts or path.name == "__main__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc:
            missing.append(_module_name(path))
    assert missing == []


def test_one_atomic_writer_and_one_photo_hash():
    """A file that must be whole after a power cut is written by durable.atomic_write (temp
    file, fsync, rename, fsync of the folder); a photo is named by templates.photo_sha256.
    Nothing else renames a temporary file over another (snapshot.py renames its folder,
    which it fsyncs itself) or hashes photo bytes on its own."""
    renames, hashes = [], []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "v1":
            continue
        text = path.read_text()
        rel = str(path.relative_to(PACKAGE))
        if rel not in ("durable.py", "gallery/snapshot.py") and (
                "os.replace(" in text or "os.rename(" in text or ".replace(path)" in text):
            renames.append(rel)
        # face/models.py checks the model files' pinned sums, not photos
        if rel not in ("templates.py", "face/models.py") and "hashlib.sha256(data)" in text:
            hashes.append(rel)
    assert not renames, f"write through matcher.durable.atomic_write: {renames}"
    assert not hashes, f"hash photos with matcher.templates.photo_sha256: {hashes}"
