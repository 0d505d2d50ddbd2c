"""``matcher identify | verify | enroll | lane``: clients of a running service."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..transport import DEFAULT_LISTEN
from .options import add_command

FRAMES_HELP = ("send the photos (1 to 8) as frames of ONE traveller in one request: the "
               "server fuses their usable faces into one probe (default: one request per photo)")


def format_match(name: str, resp) -> str:
    """One line for a MatchResponse: decision, traveller, score, reasons, timing."""
    from ..v1 import matcher_pb2 as pb

    decision = pb.Decision.Name(resp.decision)
    parts = [f"{name}: {decision}"]
    if resp.traveller_id:
        parts.append(resp.traveller_id)
    if resp.HasField("score"):
        parts.append(f"score {resp.score:.3f} (threshold {resp.threshold:.3f})")
    if resp.quality_reasons:
        parts.append("quality: " + ", ".join(resp.quality_reasons))
    if decision == "NO_MATCH":
        parts.append(f"reason {resp.reason}")
    if resp.frames:
        parts.append(f"frames used {resp.frames_used}/{len(resp.frames)}")
    if resp.HasField("document"):
        doc = resp.document
        parts.append(f"document {pb.Decision.Name(doc.decision)}"
                     + (f" {doc.score:.3f}" if doc.HasField("score") else ""))
    if resp.checks_passed:
        parts.append("passed: " + ", ".join(resp.checks_passed))
    parts.append(f"faces {resp.faces_found}, gallery v{resp.gallery_version}, "
                 f"{resp.timings_ms.get('total', 0.0):.1f} ms")
    return "  ".join(parts)


def format_frames(names: list[str], resp) -> list[str]:
    """One line per frame of a multi-frame answer: which photo, and what became of it."""
    lines = []
    for frame in resp.frames:
        reasons = f" ({', '.join(frame.quality_reasons)})" if frame.quality_reasons else ""
        lines.append(f"  frame {frame.index} {names[frame.index]}: {frame.status}{reasons}")
    return lines


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        return Path(args.token_file).read_text(encoding="utf-8").strip()
    return os.environ.get("MATCHER_TOKEN") or None


def _servers(args: argparse.Namespace) -> list[str]:
    return [a for s in args.server for a in s.split(",") if a]


def _client(args: argparse.Namespace):
    from ..client import MatcherClient

    return MatcherClient(_servers(args), token=_token(args), ca=args.ca, cert=args.cert,
                         key=args.key, timeout=args.timeout, server_name=args.server_name)


def _images(args: argparse.Namespace) -> list[Path]:
    from ..face.models import demo_photo

    paths = [Path(p) for p in args.images]
    if getattr(args, "demo_probe", False):
        paths.append(demo_photo("yaoming.jpg"))
    if not paths:
        raise SystemExit("give at least one image (or --demo-probe)")
    return paths


def _print(name: str, resp, as_json: bool) -> None:
    if as_json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps({"file": name, **MessageToDict(resp, preserving_proto_field_name=True)}))
    else:
        print(format_match(name, resp))


def _rpc_failed(path: Path | str, exc) -> None:
    print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)


def _frames_call(args: argparse.Namespace, call) -> int:
    """--frames: every photo is a frame of one traveller, one request, one answer."""
    import grpc

    paths = _images(args)
    name = "+".join(p.name for p in paths)
    try:
        resp = call([p.read_bytes() for p in paths])
    except grpc.RpcError as exc:
        _rpc_failed(name, exc)
        return 1
    _print(name, resp, args.json)
    if not args.json:
        for line in format_frames([p.name for p in paths], resp):
            print(line)
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    import grpc

    if args.frames:
        with _client(args) as client:
            return _frames_call(args, lambda frames: client.identify(frames=frames,
                                                                     top_k=args.top_k))
    status = 0
    with _client(args) as client:
        for path in _images(args):
            try:
                resp = client.identify(path.read_bytes(), top_k=args.top_k,
                                       all_faces=args.all_faces)
            except grpc.RpcError as exc:
                _rpc_failed(path, exc)
                status = 1
                continue
            _print(path.name, resp, args.json)
            for i, face in enumerate(resp.faces):
                if not args.json:
                    print(f"  face {i}: {face.traveller_id or '-'} "
                          f"{face.score:.3f} {face.reason}")
    return status


def cmd_verify(args: argparse.Namespace) -> int:
    import grpc

    document = None
    if args.document:
        # no booking: every positional argument is a capture
        args.images = [args.traveller_id, *args.images]
        args.traveller_id = ""
        document = Path(args.document).read_bytes()
    if args.frames:
        with _client(args) as client:
            return _frames_call(args, lambda frames: client.verify(
                args.traveller_id, frames=frames, document=document))
    status = 0
    with _client(args) as client:
        for path in _images(args):
            try:
                resp = client.verify(args.traveller_id, path.read_bytes(), document=document)
            except grpc.RpcError as exc:
                _rpc_failed(path, exc)
                status = 1
                continue
            _print(path.name, resp, args.json)
    return status


def cmd_enroll(args: argparse.Namespace) -> int:
    import grpc

    photos = [Path(p).read_bytes() for p in args.images]
    with _client(args) as client:
        try:
            resp = client.enroll(args.traveller_id, photos,
                                 accept_low_quality=args.accept_low_quality)
        except grpc.RpcError as exc:
            print(f"{args.traveller_id}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{resp.traveller_id}: {resp.added_templates} template(s) added, "
          f"gallery v{resp.gallery_version}")
    return 0


def cmd_lane(args: argparse.Namespace) -> int:
    from ..lane import run_lanes

    if args.requests is None and args.duration is None:
        args.duration = 10.0
    images = [p.read_bytes() for p in _images(args)]
    report = run_lanes(_servers(args), images, args.lanes, interval_s=args.interval,
                       requests_per_lane=args.requests, duration_s=args.duration,
                       token=_token(args), timeout=args.timeout, ca=args.ca, cert=args.cert,
                       key=args.key, server_name=args.server_name)
    print(json.dumps(report.summary()) if args.json else report.text())
    return 0 if report.failed == 0 else 1


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", default=None,
                   help="HOST:PORT; repeat (or comma-separate) for round robin over replicas")
    p.add_argument("--token-file", help="file holding the bearer token (or $MATCHER_TOKEN)")
    p.add_argument("--ca", help="CA certificate to trust (turns on TLS)")
    p.add_argument("--cert", help="client certificate for mutual TLS")
    p.add_argument("--key", help="client private key for mutual TLS")
    p.add_argument("--server-name", help="name in the server certificate, if not the host")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON")


def _with_default_server(func):
    """``func`` with --server defaulting to the service's default address."""
    def run(args: argparse.Namespace) -> int:
        if not args.server:
            args.server = [DEFAULT_LISTEN]
        return func(args)
    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "identify")
    p.add_argument("images", nargs="*")
    p.add_argument("--demo-probe", action="store_true",
                   help="also send the packaged yaoming.jpg")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--all-faces", action="store_true", help="answer for every face")
    p.add_argument("--frames", action="store_true", help=FRAMES_HELP)
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_identify))

    p = add_command(sub, "verify")
    p.add_argument("traveller_id", help="the booked traveller (omit it with --document)")
    p.add_argument("images", nargs="*")
    p.add_argument("--document", metavar="DG2",
                   help="verify the captures against this travel document instead of a "
                        "booking: a chip's DG2 as read (or the portrait it holds, e.g. a "
                        "JPEG 2000); nothing is stored")
    p.add_argument("--demo-probe", action="store_true")
    p.add_argument("--frames", action="store_true", help=FRAMES_HELP)
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_verify))

    p = add_command(sub, "enroll")
    p.add_argument("traveller_id")
    p.add_argument("images", nargs="+",
                   help="booking photos: any image format the service takes, or a "
                        "passport chip's DG2 (its portrait is enrolled)")
    p.add_argument("--accept-low-quality", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_enroll))

    p = add_command(sub, "lane")
    p.add_argument("images", nargs="*")
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="requests per lane")
    p.add_argument("--duration", type=float, default=None, help="seconds (default 10)")
    p.add_argument("--interval", type=float, default=None,
                   help="each lane starts a request every INTERVAL s (default: back to back)")
    p.add_argument("--demo-probe", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_lane))
