"""The store's SQLite schema, as the ordered migrations that build it, and their runner."""
from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from pathlib import Path

from ..errors import GalleryError
from .codecs import PlainCodec
from .integrity import plausible_plain, template_checksum

log = logging.getLogger(__name__)

# Each migration is applied once, in order, inside one transaction with its version row.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE travellers (
               traveller_id TEXT PRIMARY KEY,
               valid_from REAL NOT NULL,
               valid_to REAL NOT NULL,
               created_at REAL NOT NULL,
               updated_at REAL NOT NULL,
               CHECK (valid_from < valid_to)
           ) WITHOUT ROWID""",
        # AUTOINCREMENT: a template_id is never reused, so an id seen in an old snapshot
        # can never point at someone else's template.
        """CREATE TABLE templates (
               template_id INTEGER PRIMARY KEY AUTOINCREMENT,
               traveller_id TEXT NOT NULL
                   REFERENCES travellers(traveller_id) ON DELETE CASCADE,
               model_id TEXT NOT NULL,
               photo_sha256 TEXT NOT NULL,
               codec TEXT NOT NULL,
               template BLOB NOT NULL,
               created_at REAL NOT NULL,
               UNIQUE (traveller_id, photo_sha256)
           )""",
        """CREATE TABLE changes (
               gallery_version INTEGER PRIMARY KEY,
               traveller_id TEXT NOT NULL,
               kind TEXT NOT NULL CHECK (kind IN ('enrol', 'remove')),
               at REAL NOT NULL
           )""",
    )),
    # SQLite keeps no checksum of row data: a rotted byte in a plain template blob would be
    # searched as if it were true. Every row now carries a blake2b-128 digest bound to its
    # row (traveller id, photo sha256, codec), checked on every read; rows that fail are
    # listed in ``quarantine`` and never searched. Existing rows get their digest when the
    # migration runs (after a plausibility check of plain rows), see _backfill_checksums.
    (2, (
        """ALTER TABLE templates ADD COLUMN checksum BLOB""",
        """CREATE TABLE quarantine (
               template_id INTEGER PRIMARY KEY,
               traveller_id TEXT NOT NULL,
               photo_sha256 TEXT NOT NULL,
               reason TEXT NOT NULL,
               found_at REAL NOT NULL
           )""",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(c: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations ``c``'s store lacks, all in one write transaction, rolled back
    whole if any fails. The caller holds the store's write lock; ``path`` is for messages.
    Raises GalleryError for a store written by a newer build."""
    c.execute("BEGIN IMMEDIATE")
    try:
        c.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                  "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        current = c.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        if current > SCHEMA_VERSION:
            raise GalleryError(
                f"store {path} has schema version {current}, newer than this "
                f"build understands ({SCHEMA_VERSION}); upgrade matcher")
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for sql in statements:
                c.execute(sql)
            if version == 1:
                c.execute("INSERT INTO meta VALUES ('gallery_version', '0')")
                c.execute("INSERT INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            if version == 2:
                _backfill_checksums(c, path)
            c.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
            log.info("store %s migrated to schema version %d", path, version)
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise


def _backfill_checksums(c: sqlite3.Connection, path: Path) -> None:
    """Give every existing row its checksum, inside the migration's transaction.

    Computed now rather than when a row is next rewritten: rows are rarely rewritten,
    and a row without a checksum would be searched unchecked for its whole life. A
    digest taken now cannot vouch for bytes that rotted before the migration, so plain
    rows must first look like a template (512 finite float32 of unit norm); one that
    does not keeps a NULL checksum and is quarantined by the first read. Encrypted
    rows are vouched for by their AES-GCM tag when they are decrypted.
    """
    updates, implausible = [], 0
    for tid, trav, sha, codec, blob in c.execute(
            "SELECT template_id, traveller_id, photo_sha256, codec, template FROM templates"
    ).fetchall():
        if codec == PlainCodec.name and not plausible_plain(blob):
            implausible += 1
            continue
        updates.append((template_checksum(trav, sha, codec, blob), tid))
    c.executemany("UPDATE templates SET checksum=? WHERE template_id=?", updates)
    if implausible:
        log.error("store %s: %d template rows do not look like templates and get no "
                  "checksum; they will be quarantined", path.name, implausible)
