"""Photo identity and what the re-index remembers about it between runs.

A photo is known by the sha256 of its bytes: that is what the store records per template
and what decides whether a photo needs embedding at all. Photos refused for what they
contain are remembered by sha256 (and the settings that refused them), so a rerun on an
unchanged manifest embeds nothing.
"""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..durable import file_sha256
from .manifest import MISSING_FILE, NO_FACE, UNREADABLE_IMAGE

OUTCOMES_FILE = "reindex-outcomes.sqlite3"
# Reject reasons that depend only on the photo's bytes and the pipeline settings: safe to
# remember by sha256. A missing file may appear tomorrow, so it is never remembered.
# (The enrolment rule's refusals depend on the booking's other photos too: remembered per
# booking, see OutcomeCache.put_many_in.)
CACHEABLE_CODES = (UNREADABLE_IMAGE, NO_FACE)
# ...except these two, which say something about this run, not about the photo.
TRANSIENT_REASONS = (f"{UNREADABLE_IMAGE}:changed_during_run",
                     f"{UNREADABLE_IMAGE}:pipeline_error")


def unreadable_file_reason(exc: OSError) -> str:
    """The reject reason for a photo file that cannot be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return MISSING_FILE
    if isinstance(exc, IsADirectoryError):
        return f"{MISSING_FILE}:is_a_directory"
    if isinstance(exc, PermissionError):
        return f"{MISSING_FILE}:permission_denied"
    return f"{MISSING_FILE}:{type(exc).__name__}"


def sha256_file(path: Path) -> tuple[str | None, str]:
    """(hex digest, "") or (None, reject reason)."""
    try:
        return file_sha256(path), ""
    except OSError as exc:
        return None, unreadable_file_reason(exc)


def hash_photos(paths: Iterable[Path], threads: int) -> dict[Path, tuple[str | None, str]]:
    """sha256 of every distinct photo; hashlib releases the GIL, so threads overlap I/O."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(unique, pool.map(sha256_file, unique), strict=True))


def booking_key(shas: Iterable[str]) -> str:
    """A short digest of a booking's set of photos."""
    return hashlib.sha256(" ".join(sorted(shas)).encode()).hexdigest()[:16]


def remember_reject(reason: str) -> bool:
    """Whether a reject reason is a property of the photo's bytes (worth remembering)."""
    return (bool(reason) and reason.split(":", 1)[0] in CACHEABLE_CODES
            and reason not in TRANSIENT_REASONS)


class OutcomeCache:
    """sha256 -> reject reason for photos refused for their content, per pipeline setting.

    Holds no image and no template; only digests and reason codes. Pruned to the current
    manifest's photos at the end of each successful run.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.key = key
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS rejected_photos ("
                           "photo_sha256 TEXT NOT NULL, outcome_key TEXT NOT NULL, "
                           "reason TEXT NOT NULL, PRIMARY KEY (photo_sha256, outcome_key))"
                           " WITHOUT ROWID")

    def get_many(self, shas: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        shas = list(shas)
        for i in range(0, len(shas), 500):
            chunk = shas[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(
                f"SELECT photo_sha256, reason FROM rejected_photos WHERE outcome_key=? "
                f"AND photo_sha256 IN ({marks})", (self.key, *chunk)))
        return found

    def get_many_in(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """(sha256, booking key) -> reason for photos refused within that booking; looked up
        500 photos a query whatever the bookings, as ``get_many``."""
        wanted = {(sha, f"{self.key}:{booking}"): (sha, booking) for sha, booking in pairs}
        shas = sorted({sha for sha, _ in wanted})
        found = {}
        for i in range(0, len(shas), 500):
            chunk = shas[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for sha, key, reason in self._conn.execute(
                    f"SELECT photo_sha256, outcome_key, reason FROM rejected_photos WHERE "
                    f"photo_sha256 IN ({marks})", chunk):
                pair = wanted.get((sha, key))
                if pair is not None:
                    found[pair] = reason
        return found

    def put_many_in(self, items: list[tuple[str, str, str]]) -> None:
        """Remember (sha256, booking key, reason): a refusal that holds for that booking."""
        if items:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO rejected_photos VALUES (?, ?, ?)",
                                   [(sha, f"{self.key}:{booking}", reason)
                                    for sha, booking, reason in items])
            self._conn.execute("COMMIT")

    def put_many(self, items: list[tuple[str, str]]) -> None:
        if items:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO rejected_photos VALUES (?, ?, ?)",
                                   [(sha, self.key, reason) for sha, reason in items])
            self._conn.execute("COMMIT")

    def keep_only(self, shas: set[str]) -> None:
        self._conn.execute("BEGIN")
        stale = [(s, k) for s, k in self._conn.execute(
            "SELECT photo_sha256, outcome_key FROM rejected_photos")
            if s not in shas or k.split(":", 1)[0] != self.key]
        self._conn.executemany("DELETE FROM rejected_photos WHERE photo_sha256=? "
                               "AND outcome_key=?", stale)
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()
