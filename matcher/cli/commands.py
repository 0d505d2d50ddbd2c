"""The ``matcher`` commands and their parsers: which group module builds each command.

Apart from the package so that the modules that build parsers (options, config) can use
it without importing the package that imports them.
"""
from __future__ import annotations

import argparse
import importlib

# Command -> (its group's module in matcher.cli, one-line help). A module's add_parser(sub)
# adds every command of its group; a group's commands are listed together.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run the gRPC matching service"),
    "demo": ("serve", "serve with a demo gallery and show a real MATCH"),
    "identify": ("client", "1:N: who is in each image (largest face)"),
    "verify": ("client", "1:1: is the face in each image this traveller"),
    "enroll": ("client", "enrol a traveller from one or more photos"),
    "lane": ("client", "simulate N concurrent lanes; print p50/p95/p99 latency"),
    "embed": ("face", "detect faces and print one JSON line per face"),
    "compare": ("face", "cosine similarity of the largest faces of A and B"),
    "gallery": ("gallery", "gallery store and snapshots"),
    "reindex": ("reindex", "embed a bookings manifest and publish a fresh gallery snapshot"),
    "calibrate": ("calibrate", "derive a score model from labelled photos"),
    "thresholds": ("calibrate", "print the thresholds the service uses"),
    "audit": ("audit", "inspect the hash-chained audit log"),
    "config": ("config", "check a settings file and print the effective settings"),
    "bench": ("bench", "run the benchmark suites (matcher bench -h for their options)"),
}

# Commands that take --config FILE (matcher.cli.config).
CONFIGURABLE = ("serve", "demo", "reindex")

DESCRIPTION = ("Face matching for border e-gates: the gRPC service, its clients and the "
               "operator tools.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command, with only ``command``'s group imported and built in full; the others
    are listed by name and help, enough for ``--help`` and argparse's errors."""
    parser = argparse.ArgumentParser(prog="matcher", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = COMMANDS[command][0] if command in COMMANDS and command != "bench" else None
    built: set[str] = set()
    for name, (module, text) in COMMANDS.items():
        if module != wanted:
            sub.add_parser(name, help=text, add_help=False)
        elif module not in built:
            importlib.import_module(f"{__package__}.{module}").add_parser(sub)
            built.add(module)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one command inside ``parser`` (build_parser's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)
