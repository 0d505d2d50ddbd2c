"""Options several command groups share: ``--data``, the model pack, the embedder precision,
the log format; and ``Number``, the type of a numeric option with its range.

Building ``--data`` imports nothing; the model options load the model registry.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

LOG_FORMATS = ("text", "json")


def kind_of(value: object) -> str:
    """What a settings file's value is, in the words of an error message."""
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


class Number:
    """A numeric option's type and range: argparse calls it on a flag's text, a settings
    file's value (already a TOML number) goes through ``check``. Both refuse a value out
    of range with the same words, e.g. "expected an integer >= 1, got 0"."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None,
                 *, low_open: bool = False, high_open: bool = False) -> None:
        if kind not in (int, float):
            raise TypeError(f"kind must be int or float, got: {kind!r}")
        self.kind = kind
        self.low, self.high = low, high
        self.low_open, self.high_open = low_open, high_open
        self.__name__ = kind.__name__  # argparse names the type in some errors

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun

    def check(self, value: object) -> int | float:
        """``value`` as this option's number; ValueError saying what was expected."""
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or (self.kind is int and not isinstance(value, int))
                or (isinstance(value, float) and not math.isfinite(value))):
            raise ValueError(f"expected {self.describe()}, got {kind_of(value)} {value!r}")
        number: int | float = int(value) if self.kind is int else float(value)
        if ((self.low is not None and (number < self.low or (self.low_open
                                                             and number == self.low)))
                or (self.high is not None and (number > self.high or (self.high_open
                                                                      and number == self.high)))):
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        return number

    def __call__(self, text: str) -> int | float:
        try:
            value: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def __repr__(self) -> str:
        return self.describe()


COUNT = Number(int, 1)                          # threads, workers, batch sizes
SECONDS = Number(float, 0)                      # a wait or a period; 0 allowed
POSITIVE_SECONDS = Number(float, 0, low_open=True)
RATE = Number(float, 0, 1, low_open=True, high_open=True)   # FMR, FPIR, a confidence


def add_log_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text: one key=value line per event (default); json: one JSON "
                        "object per line, for journald, Loki or Elasticsearch")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="settings file (TOML; keys named as these options, e.g. "
                        "max-batch = 4); a flag given here overrides it "
                        "(docs/operations.md#the-settings-file)")


def add_command(sub: argparse._SubParsersAction, name: str,
                **kwargs) -> argparse.ArgumentParser:
    """Add command ``name`` with its one-line help from matcher.cli.commands.COMMANDS."""
    from .commands import COMMANDS

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


def add_shared_gallery_options(p: argparse.ArgumentParser) -> None:
    """The score model and snapshot retention, which the writer and the overnight job
    share (one settings file for both): one definition, one set of defaults."""
    from ..gallery.snapshot import PRUNE_AFTER_S, SNAPSHOTS_KEPT

    p.add_argument("--score-model", type=Path,
                   help="score model from 'matcher calibrate' (default: the one shipped for "
                        "the model pack); the enrolment rule's consistency threshold comes "
                        "from it too")
    p.add_argument("--snapshots-kept", type=COUNT, default=SNAPSHOTS_KEPT, metavar="N",
                   help=f"newest snapshots kept when pruning (default {SNAPSHOTS_KEPT})")
    p.add_argument("--snapshot-prune-after", type=SECONDS, default=PRUNE_AFTER_S,
                   metavar="SECONDS",
                   help="an older snapshot is deleted only once a newer one has existed "
                        "this long, longer than any replica takes to load one "
                        f"(default {PRUNE_AFTER_S:g})")
