"""``matcher serve | demo``: run the gRPC matching service."""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from .options import (
    COUNT,
    POSITIVE_SECONDS,
    RATE,
    SECONDS,
    Number,
    add_command,
    add_config_option,
    add_data_option,
    add_log_format_option,
    add_model_pack_options,
    add_shared_gallery_options,
    model_pack,
)


def _server_config(args: argparse.Namespace, demo: bool):
    from ..service.batching import BatchConfig
    from ..service.server import ServerConfig

    metrics = None if args.metrics_listen in ("", "off") else args.metrics_listen
    return ServerConfig(
        model_pack=model_pack(args), flip_augment=args.flip_augment,
        listen=args.listen, data_dir=args.data,
        role="replica" if args.replica_of else "writer",
        snapshot_source=Path(args.replica_of) if args.replica_of else None,
        watch_interval_s=args.watch_interval,
        batch=BatchConfig(max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                          max_queue=args.max_queue, workers=args.workers),
        ort_threads=args.threads, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, tokens_file=args.tokens, metrics_listen=metrics,
        audit_failure=args.audit_failure, grace_s=args.grace,
        drain_notice_s=args.drain_notice, max_snapshot_age_s=args.max_snapshot_age,
        publish_interval_s=args.publish_interval, snapshots_kept=args.snapshots_kept,
        snapshot_prune_after_s=args.snapshot_prune_after,
        demo=demo or args.demo, score_model=args.score_model, policy=_policy(args))


def _policy(args: argparse.Namespace):
    """DecisionPolicy from the target options; the defaults where none is given."""
    from ..gallery.decision import DecisionPolicy

    given = {"fmr_1to1": args.fmr, "fpir_1toN": args.fpir,
             "confidence_1toN": args.confidence_1ton}
    return DecisionPolicy(**{k: v for k, v in given.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service.server import serve

    asyncio.run(serve(_server_config(args, demo=False)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the server with the demo gallery, ask it about yaoming.jpg, keep serving."""
    from ..client import MatcherClient
    from ..face.models import demo_photo
    from ..service.server import serve
    from .client import format_match

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
    # The defaults live with the server: imported only when serve or demo is the command.
    from ..gallery.decision import DecisionPolicy
    from ..service.auditing import AUDIT_FAILURE_POLICIES
    from ..service.batching import BatchConfig
    from ..service.server import KEEPALIVE_INTERVALS, ServerConfig, default_data_dir

    p.add_argument("--listen", default=ServerConfig.listen,
                   help=f"HOST:PORT (default {ServerConfig.listen})")
    # Targets, not thresholds (docs/operating-points.md); None: the policy's defaults.
    policy = DecisionPolicy()
    p.add_argument("--fmr", type=RATE,
                   help=f"1:1 target false-match rate (default {policy.fmr_1to1:g})")
    p.add_argument("--fpir", type=RATE, help="1:N target false-positive identification rate "
                                              f"(default {policy.fpir_1toN:g})")
    p.add_argument("--confidence-1ton", type=RATE, metavar="LEVEL",
                   help="confidence of the score model's bound 1:N thresholds are taken at "
                        "(default: the level the cross-validation chose, "
                        f"{policy.confidence_1toN:g})")
    add_data_option(p, default=str(default_data_dir()),
                    help="data directory: gallery.sqlite3, snapshots/, audit.log "
                         "(default $MATCHER_DATA or ~/.matcher)")
    p.add_argument("--replica-of", metavar="SNAPSHOT_DIR",
                   help="serve read-only from the writer's snapshots in this folder")
    p.add_argument("--watch-interval", type=POSITIVE_SECONDS, default=ServerConfig.watch_interval_s,
                   help="seconds between checks for a newer snapshot "
                        f"(default {ServerConfig.watch_interval_s:g})")
    p.add_argument("--max-snapshot-age", type=POSITIVE_SECONDS,
                   default=ServerConfig.max_snapshot_age_s, metavar="SECONDS",
                   help="replica: report NOT_SERVING for lane traffic while the served "
                        "snapshot is older than this (set it above the writer's publishing "
                        "interval; default: never)")
    p.add_argument("--publish-interval", type=SECONDS, default=ServerConfig.publish_interval_s,
                   metavar="SECONDS",
                   help="writer: publish a snapshot this often if the gallery changed (and "
                        f"an unchanged one every {KEEPALIVE_INTERVALS} intervals); 0: only "
                        "on PublishSnapshot and after the overnight job "
                        f"(default {ServerConfig.publish_interval_s:g})")
    p.add_argument("--grace", type=SECONDS, default=ServerConfig.grace_s, metavar="SECONDS",
                   help="SIGTERM: seconds in-flight calls get to finish "
                        f"(default {ServerConfig.grace_s:g})")
    p.add_argument("--drain-notice", type=SECONDS, default=ServerConfig.drain_notice_s,
                   metavar="SECONDS",
                   help="SIGTERM: seconds of NOT_SERVING while still answering, so clients "
                        f"move away before the listener closes "
                        f"(default {ServerConfig.drain_notice_s:g})")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA for client certificates: turns on mutual TLS")
    p.add_argument("--tokens", type=Path, help="token file, one role:token per line")
    p.add_argument("--metrics-listen", default=ServerConfig.metrics_listen,
                   help="Prometheus /metrics HOST:PORT (port 0: a free one, logged), "
                        f"or 'off' (default {ServerConfig.metrics_listen})")
    defaults = BatchConfig()
    p.add_argument("--audit-failure", choices=AUDIT_FAILURE_POLICIES,
                   default=ServerConfig.audit_failure,
                   help="decisions while the audit log cannot be written (disk full): "
                        "fail_closed refuses them with UNAVAILABLE (default), fail_open "
                        "answers them unaudited (logged, counted)")
    p.add_argument("--max-batch", type=COUNT, default=defaults.max_batch)
    p.add_argument("--max-wait-ms", type=Number(float, 0, 1e4, high_open=True),
                   default=defaults.max_wait_s * 1e3)
    p.add_argument("--max-queue", type=COUNT, default=defaults.max_queue)
    p.add_argument("--workers", type=COUNT, default=defaults.workers,
                   help="model batches in flight at once (threads)")
    p.add_argument("--threads", type=COUNT, default=ServerConfig.ort_threads,
                   help="ONNX Runtime intra-op threads per model call")
    add_model_pack_options(p)
    add_shared_gallery_options(p)
    add_log_format_option(p)
    add_config_option(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "serve")
    p.add_argument("--demo", action="store_true",
                   help="enrol the 22 faces of the packaged players.jpg first")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve)

    p = add_command(sub, "demo")
    p.add_argument("--once", action="store_true", help="stop after the first answer")
    _add_serve_options(p)
    p.set_defaults(func=cmd_demo, demo=True)
