"""The nightly bookings manifest: read CSV or Parquet, check every row, never abort on one.

Columns ``traveller_id, photo, valid_from, valid_to`` (others are ignored). ``photo`` is a
path (relative paths are relative to the manifest's folder) or a ``file://`` URI. Windows
are ISO 8601 dates or datetimes (Parquet: date or timestamp columns too); a naive time is
UTC, a date-only ``valid_from`` starts at 00:00 UTC and a date-only ``valid_to`` covers
the whole day (the stored window is half-open, ``[valid_from, valid_to)``).

Rows are numbered from 1 in file order, the header not counted: row 1 is the first
booking. A bad row becomes a ``Reject`` with a stable reason code; only a manifest that
cannot be read at all (missing file, missing column) raises.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import InvalidInput
from ..face.enrolment import LOW_QUALITY, MULTIPLE_FACES, NO_FACE
from ..templates import MAX_TEMPLATES_PER_TRAVELLER, check_traveller_id

COLUMNS = ("traveller_id", "photo", "valid_from", "valid_to")

# Stable reason codes written to the rejects file; a detail may follow after ':'. The
# photo's own codes (no_face, multiple_faces, low_quality) are matcher.face.enrolment's,
# shared with Enroll; they are re-exported here with the rest.
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"
CONFLICTING_BOOKING = "conflicting_booking"
TOO_MANY_PHOTOS = "too_many_photos"
INVALID_ROW = "invalid_row"
REASON_CODES = (MISSING_FILE, UNREADABLE_IMAGE, NO_FACE, MULTIPLE_FACES, LOW_QUALITY,
                CONFLICTING_BOOKING, TOO_MANY_PHOTOS, INVALID_ROW)


class ManifestError(InvalidInput):
    """The manifest as a whole cannot be read (not one bad row: those are rejects)."""


@dataclass(frozen=True)
class Booking:
    """One accepted manifest row. Window in UTC epoch seconds, half-open."""

    row: int
    traveller_id: str
    photo: Path
    valid_from: float
    valid_to: float


@dataclass(frozen=True)
class Reject:
    """One refused row: ``reason`` is a code from ``REASON_CODES``, optionally ``code:detail``."""

    row: int
    traveller_id: str
    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class Manifest:
    """The checked manifest: bookings to enrol, bookings already over, refused rows."""

    bookings: list[Booking]
    expired: list[Booking]
    rejects: list[Reject]
    rows: int
    duplicates: int  # rows repeating an earlier row's traveller and photo; ignored


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, object]]]:
    """(row number, raw values) for every data row of a .csv or .parquet manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    raise ManifestError(f"manifest {path.name}: unknown format {suffix!r}; use .csv or .parquet")


def _check_columns(path: Path, names: Iterable[str]) -> None:
    missing = [c for c in COLUMNS if c not in set(names)]
    if missing:
        raise ManifestError(f"manifest {path.name} lacks column(s) {', '.join(missing)}; "
                            f"expected {', '.join(COLUMNS)}")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    # utf-8-sig: spreadsheets often write a byte-order mark before the header.
    # surrogateescape: a stray non-UTF-8 byte spoils its own row (the id is no longer
    # printable, a date no longer parses) instead of the whole manifest, and paths with
    # such bytes still name the right file.
    f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    try:
        reader = csv.DictReader(f)
        _check_columns(path, [n.strip() for n in reader.fieldnames or ()])
    except BaseException:
        f.close()
        raise
    return _numbered_csv(f, reader)


def _numbered_csv(f, reader: csv.DictReader) -> Iterator[tuple[int, dict[str, object]]]:
    with f:
        try:
            for i, raw in enumerate(reader, start=1):
                yield i, {(k or "").strip(): v for k, v in raw.items()}
        except csv.Error as exc:
            raise ManifestError(f"manifest is not valid CSV near line {reader.line_num}: "
                                f"{exc}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    import pyarrow.parquet as pq  # only the cluster extra installs pyarrow

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ManifestError(f"manifest {path.name} is not a readable Parquet file "
                            f"({type(exc).__name__})") from None
    _check_columns(path, pf.schema_arrow.names)
    return _numbered_parquet(pf)


def _numbered_parquet(pf) -> Iterator[tuple[int, dict[str, object]]]:
    i = 0
    for batch in pf.iter_batches(columns=list(COLUMNS), batch_size=65_536):
        for raw in batch.to_pylist():
            i += 1
            yield i, raw


# -- one row ---------------------------------------------------------------------------

def parse_instant(value: object, *, end_of_day: bool) -> float:
    """An ISO 8601 string, date or datetime -> UTC epoch seconds; raises ValueError.

    A date without a time is the start of that day, or with ``end_of_day`` the start of
    the next one (so ``valid_to=2026-11-26`` includes all of the 26th). Naive times are UTC.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty")
        if len(text) == 10:  # YYYY-MM-DD
            value = date.fromisoformat(text)
        else:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)
        epoch = value.timestamp()
    elif isinstance(value, date):
        day = value + timedelta(days=1) if end_of_day else value
        epoch = datetime.combine(day, time(0), tzinfo=UTC).timestamp()
    else:
        raise ValueError(f"not a date or time: {type(value).__name__}")
    if not math.isfinite(epoch):
        raise ValueError("not finite")
    return epoch


def photo_path(value: object, base: Path) -> Path:
    """A path or file:// URI -> absolute Path; raises ValueError for other schemes."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty")
    text = value.strip()
    if "://" in text or text.startswith("file:"):
        uri = urlparse(text)
        if uri.scheme != "file" or uri.netloc not in ("", "localhost"):
            raise ValueError(f"unsupported URI scheme {uri.scheme!r}")
        return Path(unquote(uri.path))
    path = Path(text)
    return path if path.is_absolute() else base / path


def _traveller_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # Parquet writers like to type numeric ids as integers
    if isinstance(value, str):
        value = value.strip()
    return check_traveller_id(value)


def parse_row(row: int, raw: dict[str, object], base: Path) -> Booking | Reject:
    """Check one raw row; a Reject says which field is wrong (``invalid_row:<field>``)."""
    raw_id = raw.get("traveller_id")
    # What the rejects file shows for an unusable id: printable, bounded.
    shown_id = "".join(c if c.isprintable() else "?"
                       for c in (str(raw_id).strip() if raw_id is not None else "")[:128])
    try:
        traveller_id = _traveller_id(raw_id)
    except InvalidInput:
        return Reject(row, shown_id, f"{INVALID_ROW}:traveller_id")
    try:
        photo = photo_path(raw.get("photo"), base)
    except ValueError:
        return Reject(row, traveller_id, f"{INVALID_ROW}:photo")
    try:
        valid_from = parse_instant(raw.get("valid_from"), end_of_day=False)
    except (ValueError, TypeError, OverflowError):
        return Reject(row, traveller_id, f"{INVALID_ROW}:valid_from")
    try:
        valid_to = parse_instant(raw.get("valid_to"), end_of_day=True)
    except (ValueError, TypeError, OverflowError):
        return Reject(row, traveller_id, f"{INVALID_ROW}:valid_to")
    if not valid_from < valid_to:
        return Reject(row, traveller_id, f"{INVALID_ROW}:window_ends_before_it_starts")
    return Booking(row, traveller_id, photo, valid_from, valid_to)


# -- the whole manifest ----------------------------------------------------------------

def load_manifest(path: str | Path, now: float) -> Manifest:
    """Read and check every row. ``now``: UTC epoch seconds deciding what has expired.

    A traveller listed with two different windows is refused on every row (we cannot tell
    which booking is right); the same window on several rows means several photos of one
    traveller (at most ``MAX_TEMPLATES_PER_TRAVELLER``; further rows are refused).
    """
    path = Path(path)
    base = path.resolve().parent
    parsed: list[Booking] = []
    rejects: list[Reject] = []
    rows = 0
    for row, raw in read_rows(path):
        rows = row
        result = parse_row(row, raw, base)
        if isinstance(result, Booking):
            parsed.append(result)
        else:
            rejects.append(result)

    by_traveller: dict[str, list[Booking]] = defaultdict(list)
    for b in parsed:
        by_traveller[b.traveller_id].append(b)
    bookings: list[Booking] = []
    expired: list[Booking] = []
    duplicates = 0
    for traveller_id, group in by_traveller.items():
        if len({(b.valid_from, b.valid_to) for b in group}) > 1:
            rejects.extend(Reject(b.row, traveller_id, CONFLICTING_BOOKING) for b in group)
            continue
        photos: dict[Path, Booking] = {}
        for b in group:
            # The same photo listed twice is one photo, not a second template.
            if photos.setdefault(b.photo, b) is not b:
                duplicates += 1
        kept = list(photos.values())
        for b in kept[MAX_TEMPLATES_PER_TRAVELLER:]:
            rejects.append(Reject(b.row, traveller_id, TOO_MANY_PHOTOS))
        kept = kept[:MAX_TEMPLATES_PER_TRAVELLER]
        (expired if group[0].valid_to <= now else bookings).extend(kept)
    bookings.sort(key=lambda b: b.row)
    expired.sort(key=lambda b: b.row)
    rejects.sort(key=lambda r: r.row)
    return Manifest(bookings, expired, rejects, rows, duplicates)
