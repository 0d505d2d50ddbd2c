"""The committed stubs are exactly what scripts/gen_protos.py makes from the .proto."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    gen = _gen_protos()
    for fresh in gen.generate(tmp_path):
        committed = REPO / "matcher" / "v1" / fresh.name
        assert committed.exists(), f"{committed} is missing; run python scripts/gen_protos.py"
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"{committed.name} is stale; run python scripts/gen_protos.py and commit")


def test_stubs_import_as_part_of_the_package() -> None:
    from matcher.v1 import matcher_pb2, matcher_pb2_grpc

    assert matcher_pb2.DESCRIPTOR.package == "matcher.v1"
    assert "Identify" in matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].methods_by_name
    assert hasattr(matcher_pb2_grpc, "MatcherStub")
