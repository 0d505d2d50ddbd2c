"""Typed errors a caller can act on; service/servicer.py maps each kind to one gRPC status code.

Messages are written for a lane operator and never contain image bytes or templates.
"""


class MatcherError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidInput(MatcherError, ValueError):
    """The request itself is wrong (bad image, missing or absurd field)."""


class EmptyImage(InvalidInput):
    pass


class UnsupportedImage(InvalidInput):
    """Readable bytes, but not an image format or mode we accept."""


class CorruptImage(InvalidInput):
    """Looks like an accepted image format but cannot be decoded completely."""


class ImageTooLarge(InvalidInput):
    """Too many bytes or too many pixels; refused before decoding."""


class ModelIntegrityError(MatcherError):
    """A model file is missing, or its sha256 is not the pinned one."""


class UnknownTraveller(MatcherError, LookupError):
    pass


class GalleryError(MatcherError):
    """The gallery cannot do what was asked in its current state."""


class SnapshotError(GalleryError):
    """A snapshot is corrupt, incomplete or made for another model."""


class StoreDamaged(GalleryError):
    """The store file fails SQLite's own check or cannot be read as a database; the
    message names the file and how to recover. Raised at start-up: never served from."""


class AuthConfigError(MatcherError):
    """The token file, certificates or listen address do not make a safe configuration."""


class StorageUnavailable(MatcherError):
    """A file the service must write cannot be written now (I/O error, a lock held by
    another process); nothing was written, a retry later may succeed."""


class DiskFull(StorageUnavailable):
    """The disk holding the store is full; nothing was written."""


class StoreBusy(StorageUnavailable):
    """Another process holds the store's write lock (or a write is stuck) past the
    time this write could wait; nothing was written."""


class AuditUnavailable(StorageUnavailable):
    """The audit log cannot be appended to (disk full, I/O error); see the
    ``audit_failure`` setting for what decisions do meanwhile."""


class Overloaded(MatcherError):
    """A bounded queue is full; the caller should retry later or elsewhere."""


class DeadlineExpired(MatcherError):
    """The request's deadline passed before it could be served."""


class NotReady(MatcherError):
    """Models or gallery are still loading."""


class DocumentUnreadable(InvalidInput):
    """A travel document's data group (ICAO 9303 DG2) or its facial record cannot be read
    safely. ``reason`` is a short code (``truncated``, ``too_deep``, ...); the message
    starts ``document_unreadable:<reason>`` and says what is wrong, never the bytes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"document_unreadable:{reason} ({detail})")
        self.reason = reason
