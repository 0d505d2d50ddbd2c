"""Append-only, hash-chained audit log of decisions and gallery changes (JSON lines).

Each line is one record::

    {"seq": 7, "time": "2026-11-25T14:20:01.123456Z", "kind": "decision",
     "fields": {"lane_id": "K-03", "request_id": "...", "decision": "MATCH", ...},
     "prev_hash": "<hash of record 6>", "hash": "<sha256 of this record without 'hash'>"}

``hash`` is the sha256 of the record's canonical JSON (sorted keys, no spaces, ASCII) with
the ``hash`` key left out, and ``prev_hash`` is the previous record's hash (64 zeros for the
first), so editing, deleting or reordering any line breaks the chain from that point on.
Dropping lines from the *end* cannot be seen from the file alone: anchor ``head()``
elsewhere (see docs/security.md).

Records hold ids, versions, scores and decisions only. Field values must be scalars, so a
template (512 floats) or an image cannot be written here even by mistake.

Durability: ``append`` returns only after an ``fsync`` that covers its record. Concurrent
appenders share fsyncs (group commit): whoever syncs first covers every record written so
far, so the extra wait is at most one fsync. Call it from a worker thread in asyncio code
(``await asyncio.to_thread(log.append, ...)``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..durable import fsync_path
from ..errors import AuditUnavailable, MatcherError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("decision", "enrol", "enrol_refused", "remove", "deletion",
                          "snapshot_swap")
GENESIS_HASH = "0" * 64
MAX_FIELDS = 32
MAX_STRING = 256
# Names that would only ever hold biometric data; refused outright.
FORBIDDEN_FIELDS = frozenset({"template", "templates", "embedding", "embeddings", "image",
                              "images", "photo", "probe", "face", "pixels"})
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# A record is at most ~10 KB (MAX_FIELDS x MAX_STRING), so a torn line plus the last
# complete one always fit in this many bytes from the end.
_TAIL_BYTES = 64 * 1024
# The log the server keeps in its data folder (ServerConfig.audit_path names another).
AUDIT_FILE = "audit.log"


class AuditError(MatcherError):
    """The audit log cannot be appended to (tampered tail, bad record, I/O failure)."""


class AuditWriteError(AuditError, AuditUnavailable):
    """The record could not be written or synced (disk full, I/O error); nothing of it
    is left in the file. A retry may succeed once the disk has room again."""


def _io_failure(exc: OSError) -> AuditWriteError:
    if exc.errno == errno.ENOSPC:
        return AuditWriteError("the audit log cannot be written: the disk is full")
    return AuditWriteError(f"the audit log cannot be written ({exc.strerror or exc})")


def _damaged(path: Path, problem: str) -> str:
    """The refusal an operator reads at start-up: the file, what is wrong, the way back."""
    return (f"audit log {path}: {problem}; matcher will not extend it. Run `matcher audit "
            f"verify {path}` to find the first bad record, keep the file for investigation "
            f"and move it aside (mv {path} {path}.damaged) so a new log starts; record the "
            f"old log's last good head from that verify output in the incident report")


@dataclass(frozen=True)
class ChainReport:
    """Result of ``verify_chain``: ``ok``, valid records before the first bad one, its seq."""

    ok: bool
    count: int
    first_bad_seq: int | None
    reason: str = ""
    head_hash: str = GENESIS_HASH  # hash of the last valid record

    def __iter__(self):  # lets callers write ``ok, count, bad = verify_chain(path)``
        return iter((self.ok, self.count, self.first_bad_seq))


def canonical_json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    if len(fields) > MAX_FIELDS:
        raise AuditError(f"an audit record takes at most {MAX_FIELDS} fields, got {len(fields)}")
    clean: dict[str, Any] = {}
    for name, value in fields.items():
        if not _FIELD_NAME.match(name) or name in FORBIDDEN_FIELDS:
            raise AuditError(f"audit field name {name!r} is not allowed")
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise AuditError(f"audit field {name!r} is not a finite number")
        elif isinstance(value, str):
            if len(value) > MAX_STRING:
                raise AuditError(f"audit field {name!r} is longer than {MAX_STRING} characters")
        elif not (value is None or isinstance(value, (bool, int))):
            # Lists, arrays and bytes are refused: that is where a template would hide.
            raise AuditError(
                f"audit field {name!r} must be a string, number, bool or null, "
                f"got {type(value).__name__}")
        clean[name] = value
    return clean


class AuditLog:
    """An open audit log file; thread-safe. Reopening continues the existing chain."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()        # orders seq, prev_hash and the write
        self._sync_lock = threading.Lock()   # one fsync at a time; others ride along
        self._written_seq = 0
        self._synced_seq = 0
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._seq, self._head = self._recover_tail()
            if created:
                fsync_path(self.path.parent)
        except BaseException:
            os.close(self._fd)
            raise
        self._written_seq = self._synced_seq = self._seq

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (0, GENESIS_HASH) for an empty log."""
        with self._lock:
            return self._seq, self._head

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record and return it once it is on disk.

        ``fields``: scalar values only (lane_id, request_id, gallery_version, model_id,
        top_score, decision, traveller_id, ...). Raises AuditError on a bad kind or field.
        """
        if kind not in KINDS:
            raise AuditError(f"unknown audit record kind {kind!r}; expected one of {KINDS}")
        clean = _check_fields(fields)
        with self._lock:
            if self._fd < 0:
                raise AuditError("the audit log is closed")
            record: dict[str, Any] = {"seq": self._seq + 1, "time": _utc_now(), "kind": kind,
                                      "fields": clean, "prev_hash": self._head}
            record["hash"] = record_hash(record)
            line = canonical_json(record) + b"\n"
            try:
                size_before = os.fstat(self._fd).st_size
            except OSError as exc:  # nothing written yet
                raise _io_failure(exc) from None
            try:
                _write_all(self._fd, line)
            except OSError as exc:
                # Leave no half line behind for the next record to be glued onto.
                os.ftruncate(self._fd, size_before)
                raise _io_failure(exc) from None
            self._seq, self._head = record["seq"], record["hash"]
            self._written_seq = record["seq"]
        self._sync_through(record["seq"])
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def _sync_through(self, seq: int) -> None:
        with self._sync_lock:
            if self._synced_seq >= seq:
                return  # an fsync that started after our write already covered it
            with self._lock:
                target, fd = self._written_seq, self._fd
            if fd < 0:
                raise AuditError("the audit log was closed before the record was synced")
            try:
                os.fsync(fd)
            except OSError as exc:
                # The record may or may not be on disk: it is not acknowledged. The chain
                # in memory already counts it, so a later record still links correctly.
                raise _io_failure(exc) from None
            self._synced_seq = target

    def _recover_tail(self) -> tuple[int, str]:
        """Find the last complete record; drop a torn final line left by a crash.

        A line without its newline was never acknowledged (append returns only after the
        whole line is written and synced), so cutting it keeps every acknowledged record.
        """
        size = os.fstat(self._fd).st_size
        start = max(0, size - _TAIL_BYTES)
        tail = os.pread(self._fd, size - start, start)
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            if cut == 0 and start > 0:
                raise AuditError(_damaged(self.path, "its end is not a record"))
            log.warning("audit log %s ends with a torn record (%d bytes); dropping it",
                        self.path, len(tail) - cut)
            os.ftruncate(self._fd, start + cut)
            os.fsync(self._fd)
            tail = tail[:cut]
        if not tail:
            return 0, GENESIS_HASH
        line_start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
        if line_start == 0 and start > 0:
            raise AuditError(_damaged(self.path, "its last record is too long to be one of ours"))
        try:
            record = json.loads(tail[line_start:])
            seq, digest = int(record["seq"]), str(record["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(_damaged(
                self.path, f"its last record is unreadable ({type(exc).__name__})")) from None
        if record_hash(record) != digest:
            raise AuditError(_damaged(self.path, f"its last record (seq {seq}) fails its "
                                                 f"hash: the log was altered or damaged"))
        # The record before it must link to it too, so damage to either end line is seen
        # before the chain is extended.
        prev_start = tail.rfind(b"\n", 0, max(line_start - 1, 0)) + 1
        if line_start > 0 and not (prev_start == 0 and start > 0):
            try:
                prev = json.loads(tail[prev_start:line_start])
                linked = (record.get("prev_hash") == prev.get("hash")
                          and record_hash(prev) == prev.get("hash"))
            except (ValueError, AttributeError):
                linked = False
            if not linked:
                raise AuditError(_damaged(self.path, f"record {seq - 1} is damaged or does not "
                                                     f"link to record {seq}"))
        return seq, digest


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every parseable record in file order (no verification; use verify_chain for that)."""
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)


def verify_chain(path: str | os.PathLike[str]) -> ChainReport:
    """Check every record's hash, seq and link to its predecessor.

    Returns ``ChainReport(ok, count, first_bad_seq)``: ``count`` valid records precede the
    first bad one, whose expected position is ``first_bad_seq`` (None when ok).
    """
    prev_hash, count = GENESIS_HASH, 0
    with open(path, "rb") as f:
        for line in f:
            problem = _line_problem(line, count + 1, prev_hash)
            if problem:
                return ChainReport(False, count, count + 1, problem, head_hash=prev_hash)
            prev_hash, count = json.loads(line)["hash"], count + 1
    return ChainReport(True, count, None, head_hash=prev_hash)


def _line_problem(line: bytes, expected_seq: int, prev_hash: str) -> str:
    """Why ``line`` is not the valid record number ``expected_seq``; "" when it is."""
    if not line.endswith(b"\n"):
        return "torn final record (no newline)"
    try:
        record = json.loads(line)
        seq, digest = record["seq"], record["hash"]
    except (ValueError, KeyError, TypeError):
        return "unreadable record"
    if record.get("kind") not in KINDS:
        return "unknown record kind"
    if seq != expected_seq:
        return f"seq {seq} where {expected_seq} was due"
    if record.get("prev_hash") != prev_hash:
        return "prev_hash does not link to the previous record"
    if record_hash(record) != digest:
        return "record hash does not match its content"
    return ""
