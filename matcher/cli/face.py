"""``matcher embed | compare``: the face pipeline on local photos, no service involved."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MatcherError
from .options import add_command, add_precision_option


def _pipeline(args: argparse.Namespace):
    from ..face.models import default_pack
    from ..face.pipeline import DetectorConfig, Pipeline

    size = tuple(args.det_size) if args.det_size else None
    return Pipeline(default_pack(args.embedder_precision or "fp32"),
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
    """Cosine similarity of the largest face in each of two images (a passport chip's DG2
    is read as its portrait)."""
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


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--det-size", type=int, nargs=2, metavar=("W", "H"),
                   help="fixed detector input as in the reference (default: per image)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    add_precision_option(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "embed")
    p.add_argument("--json", action="store_true", help="include the 512 template floats")
    p.add_argument("images", nargs="+")
    _add_pipeline_options(p)
    p.set_defaults(func=cmd_embed)

    p = add_command(sub, "compare")
    p.add_argument("a", help="a photo, or a passport chip's DG2")
    p.add_argument("b", help="a photo, or a passport chip's DG2")
    _add_pipeline_options(p)
    p.set_defaults(func=cmd_compare)
