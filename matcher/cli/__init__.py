"""The ``matcher`` command: one module per command group, imported only when one of its
commands runs, so ``matcher --help`` or ``matcher audit verify`` loads no models."""
from __future__ import annotations

import sys
from logging import DEBUG, INFO

from ..errors import MatcherError
from .commands import COMMANDS, CONFIGURABLE, build_parser, command_parser

__all__ = ["COMMANDS", "build_parser", "command_parser", "main"]


def _command(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option (-v, -h)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    if command == "bench":
        # Every argument after "bench" goes to the harness untouched: argparse cannot pass
        # options such as --out through a subcommand.
        from .bench import main as bench_main

        return bench_main(argv[argv.index("bench") + 1:])
    try:
        parser = build_parser(command)
        if command in CONFIGURABLE:
            from .config import apply_file, config_path

            path = config_path(argv)
            if path is not None:  # the file's settings become defaults; flags still win
                apply_file(command_parser(parser, command), command, path)
        args = parser.parse_args(argv)
        from .logs import setup_logging

        setup_logging(DEBUG if args.verbose else INFO, getattr(args, "log_format", "text"))
        return args.func(args)
    except MatcherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
