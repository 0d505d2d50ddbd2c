"""The store's SQLite file: its connections (WAL, synchronous=FULL), the read and write
transactions, and what an SQLite failure means to an operator."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskFull, GalleryError, StorageUnavailable, StoreBusy, StoreDamaged
from .layout import SNAPSHOT_DIR

log = logging.getLogger(__name__)


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
            f"{d / SNAPSHOT_DIR} --data OTHER_DIR`")


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


class StoreFile:
    """One SQLite store file. Thread-safe: writes are serialised and return only after
    COMMIT has been fsynced; each thread reads on its own connection.

    Its transactions (``_read``, ``_write``) are the ones of every module that works on
    stored rows: store.py (the Store built on it), integrity.py (checks, quarantine) and
    rewrap.py."""

    def __init__(self, path: str | Path, write_wait_s: float) -> None:
        self.path = Path(path)
        self.write_wait_s = write_wait_s
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            self._conn = self._connect()
        except sqlite3.Error as e:
            raise storage_error(e, self.path) from None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is left in
        # an implicit transaction and every acknowledged write is really committed.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged enrolment survives
        # a power cut, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Deleted template bytes are overwritten, not left in free pages.
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        """A per-thread read connection: WAL readers never wait for the writer's fsync."""
        if self._closed:
            raise GalleryError("the gallery store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            if hasattr(self, "_conn"):
                self._conn.close()

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction on this thread's reader: every statement in the block sees
        the same committed state, and the writer's fsync never waits on it (WAL)."""
        c = self._reader()
        c.execute("BEGIN")
        try:
            yield c
        finally:
            c.execute("COMMIT")

    @contextmanager
    def _write(self, wait_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (durable) when the block ends.

        Waits at most ``wait_s`` (capped by ``write_wait_s``) for this process's earlier
        writes and for another process's write lock, then raises StoreBusy; a full disk
        raises DiskFull. Either way the transaction is rolled back and nothing was written.
        """
        wait = self.write_wait_s if wait_s is None else max(0.0, min(wait_s, self.write_wait_s))
        deadline = time.monotonic() + wait
        if not self._write_lock.acquire(timeout=wait):
            raise StoreBusy(f"an earlier write to the gallery store {self.path.name} is still "
                            f"waiting (its write lock is held by another process, or the disk "
                            f"is stalled); nothing was written, retry later")
        try:
            if self._closed:
                raise GalleryError("the gallery store is closed")
            c = self._conn
            try:
                remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
                c.execute(f"PRAGMA busy_timeout={remaining_ms}")
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise storage_error(e, self.path) from None
            try:
                yield c
                c.execute("COMMIT")
            except BaseException as e:
                if c.in_transaction:
                    try:
                        c.execute("ROLLBACK")
                    except sqlite3.Error:  # SQLite has already rolled back, e.g. SQLITE_FULL
                        log.warning("rollback of a failed write to %s failed", self.path.name)
                if isinstance(e, sqlite3.Error):
                    raise storage_error(e, self.path) from None
                raise
        finally:
            self._write_lock.release()

    def _checkpoint_wal(self) -> bool:
        """Copy the WAL into the database file and truncate it, so rewritten rows' old
        bytes leave the -wal file; False if a reader kept it from finishing."""
        with self._write_lock:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
