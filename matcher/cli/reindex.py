"""``matcher reindex``: the overnight job from the command line."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .options import (
    COUNT,
    Number,
    add_command,
    add_config_option,
    add_data_option,
    add_log_format_option,
    add_model_pack_options,
    add_shared_gallery_options,
    model_pack,
)


def _reindex_config(args: argparse.Namespace):
    """ReindexConfig from the options (every default is ReindexConfig's own)."""
    from ..reindex.job import ReindexConfig

    return ReindexConfig(
        manifest=args.manifest, data_dir=args.data, rejects_path=args.rejects,
        use_ray=not args.no_ray, ray_address=args.ray_address, actors=args.actors,
        cpus_per_actor=args.cpus_per_actor, memory_per_actor_mb=args.memory_per_actor_mb,
        ort_threads=args.ort_threads,
        batch_size=args.batch_size, num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb, actor_start_timeout_s=args.actor_start_timeout,
        progress=not args.no_progress, flip=args.flip_augment, model_pack=model_pack(args),
        score_model=args.score_model,
        snapshots_kept=args.snapshots_kept,
        snapshot_prune_after_s=args.snapshot_prune_after)


def cmd_reindex(args: argparse.Namespace) -> int:
    from ..reindex.job import run_reindex

    if not getattr(args, "verbose", False):
        # One INFO line per enrolled traveller is right for the service, but a night of
        # millions would bury the progress lines and the summary.
        for name in ("matcher.gallery.store", "matcher.gallery.primary"):
            logging.getLogger(name).setLevel(logging.WARNING)
    summary = run_reindex(_reindex_config(args))
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(summary.lines()))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    # The defaults live with the job: imported only when reindex (or config) is the command.
    from ..reindex.job import ReindexConfig

    p = add_command(
        subparsers, "reindex",
        description="Embed every booking photo of a manifest (CSV or Parquet with columns "
                    "traveller_id, photo, valid_from, valid_to), refuse bad rows into a "
                    "rejects file, delete travellers no longer booked, and publish a "
                    "snapshot a running 'matcher serve' on the same data dir swaps in. "
                    "Reruns skip photos already in the store.")
    p.add_argument("--manifest", type=Path, required=True, help="bookings .csv or .parquet")
    add_config_option(p)
    add_data_option(p, "--out", required=True,
                    help="the gallery data dir (store + snapshots), shared with 'matcher serve'")
    p.add_argument("--rejects", type=Path, default=None,
                   help="rejects CSV (row, traveller_id, reason); default DIR/rejects.csv")
    ray = p.add_argument_group("Ray (default: a private local Ray instance)")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster: its head's HOST:PORT as 'ray start "
                          "--head' printed it (127.0.0.1:PORT for a cluster started on "
                          "loopback), 'auto' on a cluster node, or 'ray://head:10001'")
    ray.add_argument("--no-ray", action="store_true",
                     help="embed in this process instead (no Ray needed)")
    d = ReindexConfig  # its defaults: class attributes of the frozen dataclass
    ray.add_argument("--actors", type=COUNT, default=d.actors,
                     help="embedder actors (default: cluster CPUs / --cpus-per-actor)")
    ray.add_argument("--cpus-per-actor", type=Number(float, 0, low_open=True),
                     default=d.cpus_per_actor,
                     help=f"CPUs Ray reserves per actor (default {d.cpus_per_actor:g})")
    ray.add_argument("--memory-per-actor-mb", type=COUNT, default=d.memory_per_actor_mb,
                     help="memory Ray reserves per actor when placing it (default: none)")
    ray.add_argument("--ort-threads", type=COUNT, default=d.ort_threads,
                     help=f"ONNX Runtime threads per actor (default {d.ort_threads})")
    ray.add_argument("--batch-size", type=COUNT, default=d.batch_size,
                     help=f"photos per actor call (default {d.batch_size})")
    ray.add_argument("--actor-start-timeout", type=Number(float, 0, low_open=True),
                     default=d.actor_start_timeout_s, metavar="SECONDS",
                     help="fail if the actors are not all up (placed, models loaded) by "
                          f"then (default {d.actor_start_timeout_s:g})")
    ray.add_argument("--num-cpus", type=COUNT, default=d.num_cpus,
                     help="CPUs the local Ray instance may use (default: all it detects)")
    ray.add_argument("--object-store-mb", type=COUNT, default=d.object_store_mb,
                     help="object store size of the local Ray instance "
                          f"(default {d.object_store_mb})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    # The model pack and flip augmentation, as 'matcher serve' takes them: templates the
    # server it feeds can compare.
    add_model_pack_options(p)
    add_shared_gallery_options(p)
    add_log_format_option(p)
    p.set_defaults(func=cmd_reindex)

