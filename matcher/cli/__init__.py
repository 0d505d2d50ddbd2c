"""The ``matcher`` command: embed, compare, serve, lane, gallery, reindex, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import MatcherError


def _pipeline(args: argparse.Namespace):
    from ..face.models import default_pack
    from ..face.pipeline import DetectorConfig, Pipeline

    size = tuple(args.det_size) if args.det_size else None
    return Pipeline(default_pack(args.embedder_precision),
                    detector=DetectorConfig(input_size=size), threads=args.threads)


def cmd_embed(args: argparse.Namespace) -> int:
    """One JSON object per face: file, face_index, bbox, kps, det_score, quality, embedding."""
    pipe = _pipeline(args)
    status = 0
    for path in args.images:
        try:
            faces = pipe.analyse_bytes(Path(path).read_bytes())
        except (OSError, MatcherError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
            continue
        for i, face in enumerate(faces):
            record = {
                "file": str(path), "face_index": i,
                "bbox": [round(float(v), 2) for v in face.bbox],
                "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in face.kps],
                "det_score": round(face.det_score, 4),
                "quality": face.quality.as_dict(),
                "model_id": pipe.model_id,
            }
            if args.json:
                record["embedding"] = [float(v) for v in face.template]
            print(json.dumps(record))
    return status


def cmd_compare(args: argparse.Namespace) -> int:
    """Cosine similarity of the largest face in each of two images."""
    from ..face.pipeline import largest_face

    pipe = _pipeline(args)
    templates = []
    for path in (args.a, args.b):
        face = largest_face(pipe.analyse_bytes(Path(path).read_bytes()))
        if face is None:
            print(f"{path}: no face found", file=sys.stderr)
            return 1
        templates.append(face.template)
    print(f"{float(templates[0] @ templates[1]):.4f}")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Hand every argument to the harness (python -m benchmarks) untouched."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "harness.py").exists():
        print("matcher bench runs from a source checkout (benchmarks/ is not in the wheel)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    from benchmarks.__main__ import main as bench_main

    return bench_main(bench_args)


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--det-size", type=int, nargs=2, metavar=("W", "H"),
                   help="fixed detector input as in the reference (default: per image)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    p.add_argument("--embedder-precision", choices=("fp32", "int8"), default="fp32",
                   help="packaged embedder: fp32 or its int8 variant (own model id)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matcher", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="detect faces and print one JSON line per face")
    p.add_argument("--json", action="store_true", help="include the 512 template floats")
    p.add_argument("images", nargs="+")
    _add_pipeline_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("compare", help="cosine similarity of the largest faces of A and B")
    p.add_argument("a")
    p.add_argument("b")
    _add_pipeline_options(p)
    p.set_defaults(func=cmd_compare)

    # Listed for --help only: main() hands "bench ..." to the harness before parsing, since
    # argparse cannot pass options such as --out through a subcommand untouched.
    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suites (matcher bench -h for their options)")

    for module in _SUBCOMMAND_MODULES:
        __import__(f"matcher.cli.{module}", fromlist=["add_parser"]).add_parser(sub)
    return parser


# Each of these modules owns one area's subcommands through add_parser(subparsers).
_SUBCOMMAND_MODULES: tuple[str, ...] = ("audit", "calibrate", "gallery", "reindex",
                                         "serve")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except MatcherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
