"""``matcher serve | demo | lane | identify | verify | enroll``: the service and its clients."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from ..service.batching import BatchConfig
from ..service.server import DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, ServerConfig, default_data_dir

log = logging.getLogger(__name__)


# -- serving -----------------------------------------------------------------------------

def _model_pack(args: argparse.Namespace):
    from ..face.models import ModelPack, default_pack

    given = [args.detector, args.detector_sha256, args.embedder, args.embedder_sha256]
    precision = getattr(args, "embedder_precision", None)
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


def add_model_pack_options(p: argparse.ArgumentParser) -> None:
    """The model pack: the packaged one (fp32 or int8 embedder) or one given by path."""
    p.add_argument("--detector", help="SCRFD-family ONNX file (5 keypoints) instead of the "
                                      "packaged one")
    p.add_argument("--detector-sha256", help="pinned sha256 of --detector")
    p.add_argument("--embedder", help="ArcFace-family 112x112 ONNX embedder")
    p.add_argument("--embedder-sha256", help="pinned sha256 of --embedder")
    add_precision_option(p)


def add_precision_option(p: argparse.ArgumentParser) -> None:
    from ..face.models import PRECISIONS

    p.add_argument("--embedder-precision", choices=sorted(PRECISIONS), default=None,
                   help="packaged embedder: fp32 (default) or its int8 variant, which has "
                        "a model id and score model of its own (docs/operating-points.md)")


def _server_config(args: argparse.Namespace, demo: bool) -> ServerConfig:
    metrics = None if args.metrics_listen in ("", "off") else args.metrics_listen
    return ServerConfig(
        model_pack=_model_pack(args),
        listen=args.listen, data_dir=Path(args.data),
        role="replica" if args.replica_of else "writer",
        snapshot_source=Path(args.replica_of) if args.replica_of else None,
        watch_interval_s=args.watch_interval,
        batch=BatchConfig(max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                          max_queue=args.max_queue, workers=args.workers),
        ort_threads=args.threads, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, tokens_file=args.tokens, metrics_listen=metrics,
        audit_failure=args.audit_failure,
        demo=demo or args.demo, score_model=args.score_model)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service.server import serve

    asyncio.run(serve(_server_config(args, demo=False)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the server with the demo gallery, ask it about yaoming.jpg, keep serving."""
    from ..client import MatcherClient
    from ..face.models import demo_photo
    from ..service.server import serve

    config = _server_config(args, demo=True)
    probe = demo_photo("yaoming.jpg")

    async def first_call(running) -> None:
        def call() -> str:
            with MatcherClient(running.address, timeout=30.0) as client:
                return format_match(probe.name, client.identify(probe.read_bytes()))

        print(f"demo: serving on {running.address} (data in {config.data_dir})", flush=True)
        print(f"demo: identify {probe}", flush=True)
        print(await asyncio.to_thread(call), flush=True)
        if args.once:
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        else:
            print("demo: still serving; try `matcher identify --server "
                  f"{running.address} --demo-probe`; Ctrl-C stops", flush=True)

    asyncio.run(serve(config, on_ready=first_call))
    return 0


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    p.add_argument("--data", default=str(default_data_dir()),
                   help="data directory: gallery.sqlite3, snapshots/, audit.log "
                        "(default $MATCHER_DATA or ~/.matcher)")
    p.add_argument("--replica-of", metavar="SNAPSHOT_DIR",
                   help="serve read-only from the writer's snapshots in this folder")
    p.add_argument("--watch-interval", type=float, default=2.0,
                   help="seconds between checks for a newer snapshot (default 2)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA for client certificates: turns on mutual TLS")
    p.add_argument("--tokens", type=Path, help="token file, one role:token per line")
    p.add_argument("--metrics-listen", default=DEFAULT_METRICS_LISTEN,
                   help=f"Prometheus /metrics HOST:PORT, or 'off' (default {DEFAULT_METRICS_LISTEN})")
    defaults = BatchConfig()
    p.add_argument("--audit-failure", choices=("fail_closed", "fail_open"),
                   default=ServerConfig.audit_failure,
                   help="decisions while the audit log cannot be written (disk full): "
                        "fail_closed refuses them with UNAVAILABLE (default), fail_open "
                        "answers them unaudited (logged, counted)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch)
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_s * 1e3)
    p.add_argument("--max-queue", type=int, default=defaults.max_queue)
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="model batches in flight at once (threads)")
    p.add_argument("--threads", type=int, default=ServerConfig.ort_threads,
                   help="ONNX Runtime intra-op threads per model call")
    add_model_pack_options(p)
    p.add_argument("--score-model", type=Path,
                   help="score model from 'matcher calibrate' (default: the shipped one)")


# -- clients -----------------------------------------------------------------------------

def format_match(name: str, resp) -> str:
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
    parts.append(f"faces {resp.faces_found}, gallery v{resp.gallery_version}, "
                 f"{resp.timings_ms.get('total', 0.0):.1f} ms")
    return "  ".join(parts)


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


def _rpc_failed(path: Path, exc) -> None:
    print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)


def cmd_identify(args: argparse.Namespace) -> int:
    import grpc

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

    status = 0
    with _client(args) as client:
        for path in _images(args):
            try:
                resp = client.verify(args.traveller_id, path.read_bytes())
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
    p.set_defaults(server=None)


def _with_default_server(func):
    def run(args: argparse.Namespace) -> int:
        if not args.server:
            args.server = [DEFAULT_LISTEN]
        return func(args)
    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC matching service")
    p.add_argument("--demo", action="store_true",
                   help="enrol the 22 faces of the packaged players.jpg first")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="serve with a demo gallery and show a real MATCH")
    p.add_argument("--once", action="store_true", help="stop after the first answer")
    _add_serve_options(p)
    p.set_defaults(func=cmd_demo, demo=True)

    p = sub.add_parser("identify", help="1:N: who is in each image (largest face)")
    p.add_argument("images", nargs="*")
    p.add_argument("--demo-probe", action="store_true",
                   help="also send the packaged yaoming.jpg")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--all-faces", action="store_true", help="answer for every face")
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_identify))

    p = sub.add_parser("verify", help="1:1: is the face in each image this traveller")
    p.add_argument("traveller_id")
    p.add_argument("images", nargs="*")
    p.add_argument("--demo-probe", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_verify))

    p = sub.add_parser("enroll", help="enrol a traveller from one or more photos")
    p.add_argument("traveller_id")
    p.add_argument("images", nargs="+")
    p.add_argument("--accept-low-quality", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=_with_default_server(cmd_enroll))

    p = sub.add_parser("lane", help="simulate N concurrent lanes; print p50/p95/p99 latency")
    p.add_argument("images", nargs="*")
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="requests per lane")
    p.add_argument("--duration", type=float, default=None, help="seconds (default 10)")
    p.add_argument("--interval", type=float, default=None,
                   help="each lane starts a request every INTERVAL s (default: back to back)")
    p.add_argument("--demo-probe", action="store_true")
    _add_client_options(p)

    def lane(args: argparse.Namespace) -> int:
        if args.requests is None and args.duration is None:
            args.duration = 10.0
        return cmd_lane(args)

    p.set_defaults(func=_with_default_server(lane))
