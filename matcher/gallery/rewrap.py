"""Re-encoding stored templates under the store's current codec or key: turning encryption
on for a store written without a key, and rotating the key (docs/security.md)."""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

import numpy as np

from ..errors import GalleryError
from .codecs import PlainCodec, TemplateCodec, row_context
from .integrity import row_problem, template_checksum
from .store import Store

log = logging.getLogger(__name__)


def rewrap_templates(store: Store, old_codec: TemplateCodec | None = None, batch: int = 500
                     ) -> int:
    """Re-encode every template row not yet written by the store's codec / current key.

    Rows whose ``codec`` column names ``old_codec`` are decoded with it, others with
    the current codec; each is verified and rewritten in durable transactions of at
    most ``batch`` rows. Idempotent and resumable: rerun after a crash to finish (0 once
    nothing is left); ``gallery_version`` does not move.

    Returns the number of rows rewritten. Raises GalleryError (nothing written) if a
    row's codec can be decoded by neither codec, or (its batch rolled back, earlier
    batches kept) if a row does not decode, e.g. its key is not in the keyring.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got: batch={batch!r}")
    decoders: dict[str, TemplateCodec] = {store.codec.name: store.codec}
    if old_codec is not None:
        decoders[old_codec.name] = old_codec
    pending, unknown = _rows_to_rewrap(store, decoders)
    if unknown:
        names = ", ".join(f"{n} with codec {c!r}" for c, n in sorted(unknown.items()))
        raise GalleryError(
            f"cannot re-encode the store, nothing was written: templates stored as "
            f"{names}; pass the codec they were written with as old_codec (a store "
            f"written without a key: `matcher gallery rewrap --from-plain`)")
    done = 0
    for start in range(0, len(pending), batch):
        ids = pending[start:start + batch]
        with store._write() as c:
            done += _rewrap_rows(c, store.codec, ids, decoders)
        log.info("re-encoded %d of %d template rows", done, len(pending))
    if done and not store._checkpoint_wal():
        # Only cosmetic for the data: every row is rewritten; the old blobs stay in
        # the -wal file until a later checkpoint overwrites them.
        log.warning("store %s: WAL checkpoint after re-encoding was blocked by a "
                    "reader; the old template blobs leave the -wal file at the next "
                    "checkpoint", store.path.name)
    log.info("re-encoded %d template rows to codec %s", done, store.codec.name)
    return done


def _is_current(codec: TemplateCodec, name: str, blob: bytes) -> bool:
    """True if a row stored as codec ``name`` is already written by ``codec`` (and, for a
    keyed codec such as TemplateCipher, under its current key)."""
    if name != codec.name:
        return False
    key_id_of = getattr(codec, "key_id_of", None)
    return key_id_of is None or key_id_of(blob) == codec.key_id  # type: ignore[attr-defined]


def _rows_to_rewrap(store: Store, decoders: dict[str, TemplateCodec]
                    ) -> tuple[list[int], dict[str, int]]:
    """(template_ids not yet current, {undecodable codec name: row count}), read in
    one read transaction."""
    pending: list[int] = []
    unknown: dict[str, int] = {}
    with store._read() as c:
        for tid, name, blob in c.execute(
                "SELECT template_id, codec, template FROM templates ORDER BY template_id"):
            if _is_current(store.codec, name, blob):
                continue
            if name in decoders:
                pending.append(tid)
            else:
                unknown[name] = unknown.get(name, 0) + 1
    return pending, unknown


def _rewrap_rows(c: sqlite3.Connection, codec: TemplateCodec, template_ids: Sequence[int],
                 decoders: dict[str, TemplateCodec]) -> int:
    """Re-encode the given rows with ``codec`` inside the caller's write transaction; rows
    deleted or already current since they were listed are skipped (template ids are never
    reused). Returns how many were rewritten."""
    updates: list[tuple[str, bytes, bytes, int]] = []
    for tid in template_ids:
        row = c.execute("SELECT traveller_id, photo_sha256, codec, template, checksum "
                        "FROM templates WHERE template_id=?", (tid,)).fetchone()
        if row is None or _is_current(codec, row[2], row[3]):
            continue
        traveller_id, sha, name, blob, checksum = row
        if name == PlainCodec.name and row_problem(traveller_id, sha, name, blob, checksum):
            # Sealing a damaged plain blob would give it a valid tag and checksum; an
            # encrypted one is refused by its own tag below.
            raise GalleryError(f"template row {tid} fails its checksum (damaged); "
                               f"re-enrol that traveller's photo or remove the row, "
                               f"then rerun; nothing of this batch was written")
        decoder = decoders.get(name)
        if decoder is None:
            raise GalleryError(f"template row {tid} is stored with codec {name!r}, "
                               f"which neither the store's nor the old codec decodes")
        context = row_context(traveller_id, sha)
        try:
            template = decoder.decode(blob, context)
        except GalleryError as exc:
            # Same error type (e.g. TemplateDecryptError), plus the row an operator has
            # to restore or remove; the traveller id stays out of logs and messages.
            raise type(exc)(f"template row {tid}: {exc}") from None
        sealed = codec.encode(template, context)
        # A codec bug must not cost a traveller's template: check before replacing it.
        if not np.array_equal(codec.decode(sealed, context), template):
            raise GalleryError(f"re-encoding template row {tid} does not round-trip; "
                               f"nothing of this batch was written")
        updates.append((codec.name, sealed,
                        template_checksum(traveller_id, sha, codec.name, sealed), tid))
    c.executemany("UPDATE templates SET codec=?, template=?, checksum=? "
                  "WHERE template_id=?", updates)
    return len(updates)
