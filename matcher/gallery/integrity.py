"""Is a stored row, or the store file, intact; and the quarantine of rows that are not."""
from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import GalleryError, StorageUnavailable, StoreDamaged
from ..templates import EMBEDDING_DIM, NORM_TOLERANCE
from .codecs import row_context
from .database import StoreFile, damaged_store_message

log = logging.getLogger(__name__)

# Quarantining a damaged row found by a read must not stall that read (a Verify) behind a
# stuck writer; the row is skipped either way, only its record waits for a later read.
QUARANTINE_WAIT_S = 1.0


def template_checksum(traveller_id: str, photo_sha256: str, codec: str, blob: bytes) -> bytes:
    """16-byte blake2b of a stored blob bound to its row, so a flipped bit and a blob moved
    onto another traveller's row both fail. Not a MAC: it detects damage, not an attacker
    with write access (the AES-GCM codec covers that)."""
    h = hashlib.blake2b(digest_size=16, person=b"matcher-tmpl-v1")
    h.update(row_context(traveller_id, photo_sha256) + b"\x00" + codec.encode() + b"\x00")
    h.update(blob)
    return h.digest()


def row_problem(traveller_id: str, photo_sha256: str, codec: str, blob: bytes,
                 checksum: bytes | None) -> str:
    """Why a stored row is not intact ("" if it is)."""
    if checksum is None:
        return "no checksum (failed the plausibility check when the store was migrated)"
    if not hmac.compare_digest(checksum,
                               template_checksum(traveller_id, photo_sha256, codec, blob)):
        return "checksum mismatch"
    return ""


def plausible_plain(blob: bytes) -> bool:
    """A plain blob is 512 finite float32 of unit norm; used only when back-filling."""
    if len(blob) != EMBEDDING_DIM * 4:
        return False
    x = np.frombuffer(blob, dtype="<f4")
    return bool(np.isfinite(x).all()) and abs(float(np.linalg.norm(x)) - 1.0) <= NORM_TOLERANCE


@dataclass(frozen=True)
class DamagedRow:
    """A template row that failed its integrity check: quarantined, never searched."""

    template_id: int
    traveller_id: str
    photo_sha256: str
    reason: str


# -- the quarantine: damaged rows, recorded and never searched --------------------------

def quarantined_ids(c: sqlite3.Connection, traveller_id: str | None = None) -> set[int]:
    """Template ids in quarantine (of one traveller, if given), read in the caller's
    transaction."""
    if traveller_id is None:
        return {r[0] for r in c.execute("SELECT template_id FROM quarantine")}
    return {r[0] for r in c.execute("SELECT template_id FROM quarantine WHERE "
                                    "traveller_id=?", (traveller_id,))}


def quarantine(store: StoreFile, damaged: Sequence[DamagedRow], wait_s: float | None = None
               ) -> None:
    """Record damaged rows (outside any read transaction). They are skipped by every
    read whether or not this record could be written (their checksum fails each time),
    so a full disk or a held lock only delays the record."""
    if not damaged:
        return
    for d in damaged:
        # The row id is enough for the log; traveller ids stay out of logs and are
        # listed by `matcher gallery stats` from the quarantine table.
        log.error("store %s: template row %d is damaged (%s); quarantined, never "
                  "searched. `matcher gallery stats` names its traveller; re-enrol that "
                  "photo to heal it", store.path.name, d.template_id, d.reason)
    try:
        with store._write(QUARANTINE_WAIT_S if wait_s is None else wait_s) as c:
            c.executemany(
                "INSERT OR IGNORE INTO quarantine SELECT ?, ?, ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM templates WHERE template_id=?)",
                [(d.template_id, d.traveller_id, d.photo_sha256, d.reason, time.time(),
                  d.template_id) for d in damaged])
    except (StorageUnavailable, GalleryError) as exc:
        log.warning("store %s: could not record %d damaged rows yet (%s); they stay "
                    "unsearched", store.path.name, len(damaged), type(exc).__name__)


def drop_quarantined(c: sqlite3.Connection, traveller_id: str,
                     photo_sha256s: Sequence[str] | None = None) -> int:
    """Delete the traveller's quarantined rows (those of ``photo_sha256s``, or all) inside
    the caller's write transaction: re-enrolling a photo is how a damaged row is healed.
    Returns how many."""
    rows = c.execute("SELECT q.template_id, q.photo_sha256 FROM quarantine q "
                     "WHERE q.traveller_id=?", (traveller_id,)).fetchall()
    wanted = None if photo_sha256s is None else set(photo_sha256s)
    drop = [(tid,) for tid, sha in rows if wanted is None or sha in wanted]
    c.executemany("DELETE FROM templates WHERE template_id=?", drop)
    c.executemany("DELETE FROM quarantine WHERE template_id=?", drop)
    return len(drop)


def quarantined(store: StoreFile) -> list[DamagedRow]:
    """Rows in quarantine, oldest first (what `matcher gallery stats` lists)."""
    return [DamagedRow(*r) for r in store._reader().execute(
        "SELECT template_id, traveller_id, photo_sha256, reason FROM quarantine "
        "ORDER BY found_at, template_id")]


# -- checks of every row and of the file ------------------------------------------------

def verify_templates(store: StoreFile) -> list[DamagedRow]:
    """Check every template row's checksum (no decryption, no key needed); quarantine
    the rows that fail and return them (newly found ones only)."""
    damaged: list[DamagedRow] = []
    with store._read() as c:
        skip = quarantined_ids(c)
        for tid, trav, sha, codec, blob, checksum in c.execute(
                "SELECT template_id, traveller_id, photo_sha256, codec, template, checksum "
                "FROM templates"):
            if tid in skip:
                continue
            problem = row_problem(trav, sha, codec, blob, checksum)
            if problem:
                damaged.append(DamagedRow(tid, trav, sha, problem))
    quarantine(store, damaged, wait_s=store.write_wait_s)
    return damaged


def check_file(store: StoreFile, max_s: float) -> None:
    """Refuse a store file that fails ``PRAGMA quick_check`` (StoreDamaged); one too big
    to check within ``max_s`` seconds is logged and served."""
    started = time.monotonic()
    result = quick_check(store, max_s)
    if result is None:
        log.warning("store %s: PRAGMA quick_check did not finish within %.0f s and was "
                    "stopped; run `sqlite3 %s 'PRAGMA integrity_check'` off-line",
                    store.path, max_s, store.path)
    elif result != "ok":
        raise StoreDamaged(damaged_store_message(store.path, f"PRAGMA quick_check: {result}"))
    else:
        log.info("store %s: quick_check ok in %.2f s", store.path.name,
                 time.monotonic() - started)


def quick_check(store: StoreFile, max_s: float) -> str | None:
    """SQLite's ``PRAGMA quick_check``: "ok", or its first problems joined by "; ".

    None if it did not finish within ``max_s`` seconds (interrupted, so a huge store
    never holds start-up hostage; the caller logs it)."""
    conn = store._connect()
    deadline = time.monotonic() + max_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(10)").fetchall()
    except sqlite3.OperationalError as e:
        if "interrupt" in str(e):
            return None
        return str(e)
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


def integrity_check(store: StoreFile) -> str:
    """SQLite's full ``PRAGMA integrity_check`` of the store file: "ok" or its first problem."""
    return store._reader().execute("PRAGMA integrity_check").fetchone()[0]
