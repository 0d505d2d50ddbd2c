"""Writes that survive a power cut: fsync of a file and its folder, and the one atomic
file writer (snapshots, score models, calibration outputs, re-index reports, audit log)."""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HASH_CHUNK = 1 << 20


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = False
                 ) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file beside it, which
    is fsynced, renamed over ``path``, and the folder fsynced so the rename survives too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with (open(tmp, "wb") if binary
              else open(tmp, "w", encoding="utf-8", newline="")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in chunks (photos, snapshot files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
