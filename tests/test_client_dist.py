"""The ``matcher-client`` distribution (clients/python): built from this repository into a
fresh virtual environment, it imports without numpy, FAISS, ONNX Runtime or the server
side, and talks to a running server."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from service_helpers import ServerThread, server_config

from matcher.face.models import demo_photo

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "clients" / "python"


def test_the_client_distribution_has_the_package_version():
    client = tomllib.loads((DIST / "pyproject.toml").read_text())["project"]
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert client["version"] == package["version"]
    deps = " ".join(client["dependencies"])
    for heavy in ("numpy", "faiss", "onnx", "pillow", "insightface"):
        assert heavy not in deps.lower(), heavy


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_built_into_a_fresh_venv_it_imports_alone_and_talks_to_a_server(tmp_path, pipeline):
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(DIST)], timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next(wheels.glob("matcher_client-*.whl"))

    venv = tmp_path / "lane-pc"
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], timeout=600)
    if installed.returncode != 0:
        if re.search(r"(?i)connection|resolve|network|temporary failure|no matching dist",
                     installed.stderr):
            pytest.skip("cannot install grpcio/protobuf into a fresh venv here (offline)")
        pytest.fail(installed.stdout[-2000:] + installed.stderr[-3000:])

    photo = tmp_path / "probe.jpg"
    photo.write_bytes(demo_photo("yaoming.jpg").read_bytes())
    with ServerThread(server_config(tmp_path / "data", demo=True), pipeline) as srv:
        script = textwrap.dedent(f"""
            import importlib.util, sys
            from pathlib import Path
            from matcher.client import MatcherClient, make_probe
            from matcher.v1 import matcher_pb2 as pb
            for absent in ("numpy", "faiss", "onnxruntime", "PIL", "matcher.service",
                           "matcher.face", "matcher.gallery"):
                assert importlib.util.find_spec(absent.split(".")[0]) is None or \\
                    absent.startswith("matcher."), absent
                if absent.startswith("matcher."):
                    assert importlib.util.find_spec(absent) is None, absent
            with MatcherClient(["{srv.address}"], timeout=30) as client:
                answer = client.identify(Path(r"{photo}").read_bytes())
                assert answer.decision == pb.MATCH, answer
                info = client.gallery_info()
                probe = make_probe(template=[1.0] + [0.0] * 511)  # floats, no numpy
                assert len(probe.template.values) == 512
            print("ok", answer.traveller_id, info.role)
        """)
        ran = _run([str(python), "-c", script], timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("ok demo-player-"), ran.stdout
    listed = _run([str(python), "-m", "pip", "list", "--format=freeze"], timeout=60).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert "matcher-client" in names
    assert not names & {"numpy", "faiss-cpu", "onnxruntime", "onnx", "pillow", "matcher"}, names
