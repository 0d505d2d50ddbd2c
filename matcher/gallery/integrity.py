"""Is a stored row, or the store file, intact; and what the operator reads when it is not."""
from __future__ import annotations

import hashlib
import hmac
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DiskFull, StorageUnavailable, StoreBusy, StoreDamaged
from ..templates import EMBEDDING_DIM, NORM_TOLERANCE
from .codecs import row_context


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


def damaged_store_message(path: Path, detail: str) -> str:
    """What an operator reads when the store cannot be served from: the file, the
    problem, and the ways back."""
    d = path.parent
    return (f"gallery store {path} is damaged ({detail[:200]}); matcher will not serve from "
            f"it. Keep it for investigation: move it aside with its -wal and -shm files "
            f"(mv {path} {path}.damaged), then restore the last good backup of it, or rebuild "
            f"it from the bookings with `matcher reindex --manifest BOOKINGS --data {d}`; "
            f"check the result with `matcher gallery stats --data {d}`. Meanwhile a read "
            f"replica can serve the last good snapshot: `matcher serve --replica-of "
            f"{d / 'snapshots'} --data OTHER_DIR`")


def storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A typed error for an SQLite failure an operator can act on (disk full, lock held
    by another process, I/O error, damaged file); other errors come back unchanged."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name == "SQLITE_FULL" or "disk is full" in text:
        return DiskFull(f"disk full: the disk holding the gallery store {path.name} has no "
                        f"space left; nothing was written. Free space on it: enrolment "
                        f"resumes without a restart")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreBusy(f"the gallery store {path.name} is locked by another process (or "
                         f"its disk is stalled) for longer than this write could wait; "
                         f"nothing was written, retry later")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text \
            or "not a database" in text:
        return StoreDamaged(damaged_store_message(path, text))
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return StorageUnavailable(f"the gallery store {path.name} cannot be written "
                                  f"({name}: disk I/O error); nothing was written")
    return exc
