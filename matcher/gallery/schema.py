"""The store's SQLite schema, as the ordered migrations that build it."""
from __future__ import annotations

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
