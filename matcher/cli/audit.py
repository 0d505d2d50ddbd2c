"""``matcher audit verify PATH``: check an audit log's hash chain from the command line."""
from __future__ import annotations

import argparse

from .options import add_command


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every record links and hashes correctly, 1 at the first break."""
    from ..service.audit import verify_chain

    report = verify_chain(args.path)
    if report.ok:
        print(f"ok: {report.count} records, chain intact, head hash {report.head_hash}")
        return 0
    print(f"BROKEN: {report.count} valid records, then record {report.first_bad_seq}: "
          f"{report.reason}")
    return 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "audit")
    sub = p.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser("verify", help="check every record's hash and link; exit 1 if broken")
    v.add_argument("path", help="the audit log (JSON lines)")
    v.set_defaults(func=cmd_verify)
