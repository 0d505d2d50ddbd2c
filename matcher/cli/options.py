"""Options several command groups share: ``--data``, the model pack, the embedder precision.

Building ``--data`` imports nothing; the model options load the model registry.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_command(sub: argparse._SubParsersAction, name: str,
                **kwargs) -> argparse.ArgumentParser:
    """Add command ``name`` with its one-line help from matcher.cli.COMMANDS."""
    from . import COMMANDS

    return sub.add_parser(name, help=COMMANDS[name][1], **kwargs)


def add_data_option(p: argparse.ArgumentParser, *old_names: str, help: str,
                    required: bool = False, default: str | None = None) -> None:
    """``--data DIR``, the data directory (``args.data``, a Path). ``old_names`` are earlier
    spellings of it: still accepted, never shown by --help."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--data", type=Path, default=default, metavar="DIR", help=help)
    for name in old_names:
        group.add_argument(name, dest="data", type=Path, default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def add_precision_option(p: argparse.ArgumentParser) -> None:
    # only the commands that run the models take this option, so loading them here is free
    from ..face.models import PRECISIONS

    p.add_argument("--embedder-precision", choices=sorted(PRECISIONS), default=None,
                   help="packaged embedder: fp32 (default) or its int8 variant, which has "
                        "a model id and score model of its own (docs/operating-points.md)")


def add_model_pack_options(p: argparse.ArgumentParser) -> None:
    """The model pack: the packaged one (fp32 or int8 embedder) or one given by path."""
    p.add_argument("--detector", help="SCRFD-family ONNX file (5 keypoints) instead of the "
                                      "packaged one")
    p.add_argument("--detector-sha256", help="pinned sha256 of --detector")
    p.add_argument("--embedder", help="ArcFace-family 112x112 ONNX embedder")
    p.add_argument("--embedder-sha256", help="pinned sha256 of --embedder")
    add_precision_option(p)
    p.add_argument("--flip-augment", action="store_true",
                   help="templates as embed(face) + embed(mirrored face): needs a score "
                        "model calibrated with it and a gallery enrolled with it; off by "
                        "default (docs/pipeline.md#flip-augmentation)")


def model_pack(args: argparse.Namespace):
    """The ModelPack the options of add_model_pack_options name (None: the server's default)."""
    from ..face.models import ModelPack, default_pack

    given = [args.detector, args.detector_sha256, args.embedder, args.embedder_sha256]
    precision = args.embedder_precision
    if not any(given):
        return default_pack(precision) if precision else None
    if precision:
        raise SystemExit("--embedder-precision chooses a packaged embedder; a custom "
                         "--embedder is used as given")
    if not all(given):
        raise SystemExit("a custom model pack needs --detector, --detector-sha256, "
                         "--embedder and --embedder-sha256")
    return ModelPack.from_paths(args.detector, args.detector_sha256, args.embedder,
                                args.embedder_sha256)
