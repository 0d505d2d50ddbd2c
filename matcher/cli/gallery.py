"""``matcher gallery stats|export-snapshot|verify-snapshot|rewrap``: the gallery for operators."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import GalleryError, SnapshotError
from .options import add_command, add_data_option


def _model_id(args: argparse.Namespace, store_path: Path) -> str:
    """--model-id, else the model the store was made for, else the default pack's."""
    from ..gallery.store import stored_model_id

    if args.model_id:
        return args.model_id
    stored = stored_model_id(store_path)
    if stored:
        return stored
    from ..face.models import default_pack

    return default_pack().model_id


def cmd_stats(args: argparse.Namespace) -> int:
    """Counts and versions from the store and the snapshots; builds no index."""
    from ..gallery.integrity import quarantined, verify_templates
    from ..gallery.layout import SNAPSHOT_DIR, STORE_FILE
    from ..gallery.snapshot import list_snapshots, verify_snapshot
    from ..gallery.store import Store

    data_dir = args.data
    store_path = data_dir / STORE_FILE
    if not store_path.is_file():
        print(f"error: no gallery store at {store_path}", file=sys.stderr)
        return 2
    with Store.open(store_path, _model_id(args, store_path)) as store:
        travellers, templates = store.counts()
        out: dict[str, object] = {
            "data_dir": str(data_dir), "model_id": store.model_id,
            "store_id": store.store_id, "schema_version": store.schema_version,
            "gallery_version": store.gallery_version, "travellers": travellers,
            "templates": templates}
        snapshots: list[dict[str, object]] = []
        # Every row's checksum (no key needed); damaged rows are quarantined as they would
        # be at the service's next start, and listed by traveller for re-enrolment.
        verify_templates(store)
        # the N of a 1:N search now (one fused template per traveller), after the check: a
        # traveller left with no intact template is not searched
        out["searchable_now"] = store.searchable_at(time.time())
        out["quarantined"] = [{"template_id": d.template_id, "traveller_id": d.traveller_id,
                               "photo_sha256": d.photo_sha256, "reason": d.reason}
                              for d in quarantined(store)]
        for path in list_snapshots(data_dir / SNAPSHOT_DIR):
            entry: dict[str, object] = {"name": path.name}
            try:
                m = verify_snapshot(path, store.model_id, store.store_id)
                entry.update(ok=True, gallery_version=m.gallery_version,
                             behind=store.gallery_version - m.gallery_version,
                             index_kind=m.index_kind, travellers=m.travellers,
                             templates=m.template_count)
            except SnapshotError as e:
                entry.update(ok=False, error=str(e))
            snapshots.append(entry)
        out["snapshots"] = snapshots
    print(json.dumps(out, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Rebuild the index from the store (unless --no-rebuild) and write a snapshot."""
    from ..gallery.index import IndexConfig
    from ..gallery.layout import STORE_FILE
    from ..gallery.primary import GalleryConfig, PrimaryGallery
    from ..gallery.snapshot import verify_snapshot

    data_dir = args.data
    if not (data_dir / STORE_FILE).is_file():
        print(f"error: no gallery store at {data_dir / STORE_FILE}", file=sys.stderr)
        return 2
    config = GalleryConfig(IndexConfig(index_kind=args.index_kind, sq8=args.sq8))
    # A fresh build from the store is the snapshot; loading an old one first is wasted work.
    with PrimaryGallery.open(data_dir, _model_id(args, data_dir / STORE_FILE), config,
                      use_snapshots=args.no_rebuild) as gallery:
        if not args.no_rebuild:
            gallery.rebuild()
        path = gallery.export_snapshot(args.out)
        m = verify_snapshot(path, gallery.model_id, gallery.store.store_id)
    print(json.dumps({"snapshot": str(path), "gallery_version": m.gallery_version,
                      "index_kind": m.index_kind, "travellers": m.travellers,
                      "templates": m.template_count}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 if the snapshot is intact (and fits the store, with --data), else 1."""
    from ..gallery.index import IndexConfig
    from ..gallery.layout import STORE_FILE
    from ..gallery.snapshot import read_snapshot, verify_snapshot
    from ..gallery.store import Store

    try:
        if args.data:
            store_path = args.data / STORE_FILE
            with Store.open(store_path, _model_id(args, store_path)) as store:
                m, index = read_snapshot(args.path, store.model_id, store.store_id,
                                         IndexConfig())
                behind = store.gallery_version - m.gallery_version
        else:
            m = verify_snapshot(args.path, args.model_id)
            behind = None
    except (SnapshotError, GalleryError) as e:
        print(f"REFUSED: {e}")
        return 1
    print(f"ok: {m.path.name}: gallery_version {m.gallery_version}, {m.travellers} travellers,"
          f" {m.template_count} templates, {m.index_kind} index, model {m.model_id}"
          + ("" if behind is None else f", {behind} store changes newer (replayed on load)"))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got: {value}")
    return value


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Re-encrypt every template not yet under the current key (and, with --from-plain,
    encrypt a store written without a key); prints the count as JSON."""
    from ..gallery.codecs import ENV_KEY, ENV_KEY_FILE, PlainCodec, codec_from_env
    from ..gallery.layout import STORE_FILE
    from ..gallery.rewrap import rewrap_templates
    from ..gallery.store import Store

    store_path = args.data / STORE_FILE
    if not store_path.is_file():
        print(f"error: no gallery store at {store_path}", file=sys.stderr)
        return 2
    codec = codec_from_env()
    if codec is None:
        print(f"error: no template key is configured: set {ENV_KEY} or {ENV_KEY_FILE} "
              f"(the new key first) as for the service", file=sys.stderr)
        return 2
    old_codec = PlainCodec() if args.from_plain else None
    with Store.open(store_path, _model_id(args, store_path), codec) as store:
        rewrapped = rewrap_templates(store, old_codec, batch=args.batch)
        _, templates = store.counts()
    print(json.dumps({"rewrapped": rewrapped, "templates": templates,
                      "key_id": codec.key_id}))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..gallery.index import INDEX_KINDS  # every gallery command opens the store or index

    p = add_command(subparsers, "gallery")
    sub = p.add_subparsers(dest="gallery_command", required=True)

    def common(q: argparse.ArgumentParser, data_required: bool = True) -> None:
        add_data_option(q, "--data-dir", required=data_required,
                        help="gallery folder (gallery.sqlite3 and snapshots/)")
        q.add_argument("--model-id", help="default: the model the store was made for")

    s = sub.add_parser("stats", help="counts, versions and snapshot health as JSON")
    common(s)
    s.set_defaults(func=cmd_stats)

    e = sub.add_parser("export-snapshot", help="rebuild from the store and write a snapshot")
    common(e)
    e.add_argument("--out", help="snapshot root (default: DIR/snapshots)")
    e.add_argument("--index-kind", default="auto", choices=INDEX_KINDS)
    e.add_argument("--sq8", action="store_true", help="8-bit codes in an approximate index")
    e.add_argument("--no-rebuild", action="store_true",
                   help="write the current snapshot's index as is (changes are replayed)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify-snapshot", help="check a snapshot's checksums and identity")
    common(v, data_required=False)
    v.add_argument("path", help="a snapshot folder (gallery-v...)")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("rewrap", help="re-encrypt templates under the current key "
                                      "(key from MATCHER_TEMPLATE_KEY[_FILE])")
    common(r)
    r.add_argument("--from-plain", action="store_true",
                   help="also encrypt templates stored without a key (turning encryption on)")
    r.add_argument("--batch", type=_positive_int, default=500,
                   help="rows per write transaction (default 500)")
    r.set_defaults(func=cmd_rewrap)
