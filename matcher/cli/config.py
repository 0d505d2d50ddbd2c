"""Settings files: ``matcher serve|demo|reindex --config FILE`` and ``matcher config check``.

A settings file is TOML (read with the standard library's tomllib). Its top-level keys are
``matcher serve``'s options, each named as its flag without the dashes
(``max-batch = 4``, ``tls-cert = "/etc/matcher/server.crt"``, ``flip-augment = true``);
the table ``[reindex]`` holds the overnight job's own options (``manifest``, ``actors``,
...). The job takes the top-level keys it shares with serve (data directory, model pack,
flip augmentation, snapshot retention, log format) from the same file, so the writer and
the job that feeds it cannot drift apart; a shared key inside ``[reindex]`` is refused.

A flag on the command line overrides the file. An unknown key, a value of the wrong type
or out of its option's range stops the command with the file, line and key named, every
such problem at once.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import MatcherError
from .options import Number, add_command, kind_of

REINDEX_TABLE = "reindex"
# Options that are not settings: the file itself, and help.
NOT_SETTINGS = {"config", "help"}
# Options whose value names a secret: shown as the path they are, never read here.
SECRET_PATHS = {"tokens", "tls-key"}
TEMPLATE_KEY_ENV = ("MATCHER_TEMPLATE_KEY_FILE", "MATCHER_TEMPLATE_KEY")


class ConfigError(MatcherError):
    """A settings file that cannot be used; the message names file, line and key."""


@dataclass(frozen=True)
class Setting:
    """One key of the file: the checked value (as argparse makes it), where it was written."""

    key: str
    value: object
    line: int | None


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key (long flag without dashes) -> its action, for every setting of ``parser``.
    Earlier spellings of an option (help suppressed) are not keys. (argparse keeps its
    actions and groups in underscored lists: the one way to map a key to its option.)"""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for flag in action.option_strings:
            if flag.startswith("--") and flag[2:] not in NOT_SETTINGS:
                keys[flag[2:]] = action
    return keys


def _command_parser(command: str) -> argparse.ArgumentParser:
    """The full parser of one command (``serve``, ``demo`` or ``reindex``)."""
    from .commands import build_parser, command_parser

    return command_parser(build_parser(command), command)


_TABLE = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")
_KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)"""
                  r"""(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """(table, key) path -> the 1-based line it is set on (tomllib keeps no positions)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _TABLE.match(line)
        if header:
            table = tuple(p.strip().strip("\"'") for p in header.group(1).split("."))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            parts = tuple(p.strip().strip("\"'") for p in key.group(1).split("."))
            lines.setdefault(table + parts, number)
    return lines


def _check(action: argparse.Action, value: object) -> object:
    """The value argparse would have made of the flag; ValueError saying what is wrong."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {kind_of(value)} {value!r}")
        return value
    kind = action.type
    if isinstance(kind, Number):
        return kind.check(value)
    if kind in (int, float):  # an option not given a range yet
        return Number(kind).check(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {kind_of(value)} {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}; "
                         f"got {value!r}")
    try:
        return kind(value) if callable(kind) else value
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(str(exc)) from None


class SettingsFile:
    """A settings file, read and checked against serve's and reindex's options."""

    def __init__(self, path: Path, top: dict[str, Setting], reindex: dict[str, Setting],
                 shared: set[str]) -> None:
        self.path = path
        self.top = top            # serve's settings (the shared ones among them)
        self.reindex = reindex    # [reindex]
        self.shared = shared      # keys serve and reindex both take, set at the top

    @classmethod
    def read(cls, path: Path) -> SettingsFile:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the settings file: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        lines = key_lines(text)
        serve_keys = _option_actions(_command_parser("serve"))
        reindex_keys = _option_actions(_command_parser("reindex"))
        shared = set(serve_keys) & set(reindex_keys)
        problems: list[tuple[int, str]] = []  # (line, message), reported in file order

        def problem(key: tuple[str, ...], message: str) -> None:
            line = lines.get(key)
            problems.append((line or 0, f"{path}:{line}: {message}" if line is not None
                             else f"{path}: {message}"))

        def settings(table: dict, keys: dict[str, argparse.Action], prefix: tuple[str, ...],
                     refused: set[str], refusal: str) -> dict[str, Setting]:
            found = {}
            for key, value in table.items():
                name = ".".join(prefix + (key,))
                if key in refused:
                    problem(prefix + (key,), f"{name}: {refusal}")
                    continue
                action = keys.get(key)
                if action is None:
                    near = difflib.get_close_matches(key.replace("_", "-"), list(keys), 1)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    problem(prefix + (key,), f"unknown key {name}{hint}")
                    continue
                try:
                    checked = _check(action, value)
                except ValueError as exc:
                    problem(prefix + (key,), f"{name}: {exc}")
                    continue
                found[key] = Setting(key, checked, lines.get(prefix + (key,)))
            return found

        job = data.pop(REINDEX_TABLE, {})
        if not isinstance(job, dict):
            problem((REINDEX_TABLE,), f"{REINDEX_TABLE}: expected a table "
                                      f"[{REINDEX_TABLE}] of the overnight job's options")
            job = {}
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        for key in tables:
            problem((key,), f"unknown table [{key}]: the file holds matcher serve's "
                            f"options at the top level and the overnight job's in "
                            f"[{REINDEX_TABLE}]")
        top = settings({k: v for k, v in data.items() if k not in tables}, serve_keys, (),
                       set(), "")
        reindex = settings(job, reindex_keys, (REINDEX_TABLE,), shared,
                           "shared with matcher serve: set it once, at the top level")
        if problems:
            raise ConfigError("\n".join(text for _, text in sorted(problems)))
        return cls(path, top, reindex, shared)

    def for_command(self, command: str) -> dict[str, Setting]:
        """The settings ``command`` takes from this file."""
        if command == REINDEX_TABLE:
            return {**{k: s for k, s in self.top.items() if k in self.shared}, **self.reindex}
        return dict(self.top)


def apply_file(parser: argparse.ArgumentParser, command: str, path: Path) -> SettingsFile:
    """Make the file's settings ``parser``'s defaults, so a flag given still wins; an
    option the file sets is no longer required on the command line."""
    settings_file = SettingsFile.read(path)
    settings = settings_file.for_command(command)
    actions = _option_actions(parser)
    given = {actions[k].dest: s.value for k, s in settings.items() if k in actions}
    parser.set_defaults(**given)
    for action in parser._actions:
        if action.dest in given:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in given for a in group._group_actions):
            group.required = False
    return settings_file


def config_path(argv: list[str]) -> Path | None:
    """The ``--config FILE`` of a command line, if any."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    return known.config


# -- matcher config check -------------------------------------------------------------

def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options ``argv`` sets (parsed with every default suppressed)."""
    saved = [(a, a.default, a.required) for a in parser._actions]
    groups = [(g, g.required) for g in parser._mutually_exclusive_groups]
    try:
        for action in parser._actions:
            action.default, action.required = argparse.SUPPRESS, False
        for group, _ in groups:
            group.required = False
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
        for group, required in groups:
            group.required = required
    return set(vars(given))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def effective(command: str, path: Path, flags: list[str]) -> list[str]:
    """The effective settings of ``command`` run with ``--config path`` and ``flags``, as
    TOML lines each saying where its value came from."""
    parser = _command_parser(command)
    settings = apply_file(parser, command, path).for_command(command)
    required = {a.dest for a in parser._actions if a.required}
    required |= {a.dest for g in parser._mutually_exclusive_groups if g.required
                 for a in g._group_actions}
    for action in parser._actions:  # a missing one is printed as such, not refused
        action.required = False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    args = parser.parse_args([*flags, "--config", str(path)])
    from_flags = _given_on_command_line(_command_parser(command), flags)
    out = []
    for key, action in sorted(_option_actions(parser).items()):
        value = getattr(args, action.dest, None)
        if action.dest in from_flags:
            source = "flag"
        elif key in settings:
            source = f"{path.name}:{settings[key].line}"
        else:
            source = "default"
        if key in SECRET_PATHS and value is not None:
            source += "; a secret: its path, never its content"
        line = (f"{key} = {_toml(value)}" if value is not None
                else f"# {key} is not set{' (required)' if action.dest in required else ''}")
        out.append(f"{line:<60} # {source}")
    return out


def _template_key_line() -> str:
    for name in TEMPLATE_KEY_ENV:
        value = os.environ.get(name)
        if value:
            shown = value if name.endswith("_FILE") else "(set; the key itself is not shown)"
            return f"# templates at rest: encrypted, key from ${name} = {shown}"
    return "# templates at rest: plain (no $MATCHER_TEMPLATE_KEY_FILE in this environment)"


def cmd_check(args: argparse.Namespace) -> int:
    commands = [args.for_command] if args.for_command else ["serve", REINDEX_TABLE]
    if args.flags and not args.for_command:
        raise ConfigError("flags are checked for one command: matcher config check FILE "
                          "serve|reindex FLAG ...")
    SettingsFile.read(args.file)  # every problem of the file at once, for both commands
    print(f"# {args.file}: valid. Effective settings (value, then where it came from):")
    for command in commands:
        header = "" if command != REINDEX_TABLE else f"[{REINDEX_TABLE}]  "
        print(f"\n# {header}matcher {command}")
        print("\n".join(effective(command, args.file, args.flags)))
    print(f"\n{_template_key_line()}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "config", description=__doc__.split("\n\n")[1])
    groups = p.add_subparsers(dest="config_command", required=True)
    check = groups.add_parser(
        "check", help="validate a settings file and print the effective settings",
        description="Validate FILE (every problem named with its line), then print the "
                    "settings matcher serve and the overnight job would run with: the "
                    "file's, a flag's (given after the command name) or the default.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("for_command", nargs="?", choices=["serve", "demo", REINDEX_TABLE],
                       metavar="serve|reindex", help="only this command, with FLAGs")
    check.add_argument("flags", nargs=argparse.REMAINDER, metavar="FLAG",
                       help="flags of that command, as on its command line")
    check.set_defaults(func=cmd_check)
