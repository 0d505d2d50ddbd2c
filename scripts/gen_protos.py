"""Regenerate matcher/v1/*_pb2*.py from protos/ (the one way the stubs are made).

    python scripts/gen_protos.py            # write into the repo
    python scripts/gen_protos.py --out DIR  # write elsewhere (tests/test_protos_fresh.py)

Run from anywhere; paths are relative to the repo. The generated files carry protoc's
DO NOT EDIT banner and are committed, so installing matcher never needs grpcio-tools.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTOS = ("matcher/v1/matcher.proto",)
GENERATED = ("matcher_pb2.py", "matcher_pb2.pyi", "matcher_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on PROTOS into ``out``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc  # build-time only: not a runtime dependency

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return [out / "matcher" / "v1" / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO,
                        help="root to write matcher/v1/ under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
