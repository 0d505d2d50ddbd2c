"""The durable traveller store: one SQLite file (WAL, synchronous=FULL), versioned schema.

Holds travellers (booking window in UTC epoch seconds), their templates (float32 512-d,
through a ``TemplateCodec`` so they can be encrypted at rest), and a ``changes`` log with
one monotonic ``gallery_version`` per change, which snapshots replay. Never a photo: only
the sha256 of the photo a template came from.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import GalleryError, InvalidInput, UnknownTraveller
from ..templates import (
    EMBEDDING_DIM,
    MAX_TEMPLATES_PER_TRAVELLER,
    check_templates,
    check_traveller_id,
    to_epoch,
)
from .codecs import PlainCodec, TemplateCodec, row_context
from .database import StoreFile, storage_error
from .integrity import (
    DamagedRow,
    check_file,
    drop_quarantined,
    quarantine,
    quarantined_ids,
    row_problem,
    template_checksum,
)
from .schema import migrate

log = logging.getLogger(__name__)

# How long a write may wait for the store's write lock (ours or another process's) when the
# caller gives no deadline; a write never hangs a request or a shutdown for longer.
DEFAULT_WRITE_WAIT_S = 10.0


@dataclass(frozen=True)
class Traveller:
    """One booked traveller; ``templates`` is (k, 512) float32, one row per photo (a read
    replica holds only their fused template: one row, ``template_count`` photos)."""

    traveller_id: str
    valid_from: float  # UTC epoch seconds, inclusive
    valid_to: float    # UTC epoch seconds, exclusive
    created_at: float
    updated_at: float
    templates: np.ndarray
    template_ids: tuple[int, ...]
    photo_sha256s: tuple[str, ...]
    model_id: str
    template_count: int  # intact templates stored for the traveller, one per booking photo


@dataclass(frozen=True)
class EnrolResult:
    traveller_id: str
    gallery_version: int
    added_templates: int
    changed: bool  # False when the same photos and window were already stored


@dataclass(frozen=True)
class Enrolment:
    """One traveller's enrolment for ``Store.enroll_many``: templates (k, 512) float32
    L2-normalised, one photo sha256 per row, booking window [valid_from, valid_to)."""

    traveller_id: str
    templates: np.ndarray
    valid_from: datetime | float
    valid_to: datetime | float
    photo_sha256s: Sequence[str]
    model_id: str | None = None


@dataclass(frozen=True)
class _Checked:
    """An Enrolment after validation: epoch seconds, contiguous (k, 512) float32."""

    traveller_id: str
    templates: np.ndarray
    valid_from: float
    valid_to: float
    photo_sha256s: list[str]


@dataclass(frozen=True)
class Change:
    gallery_version: int
    traveller_id: str
    kind: str  # "enrol" | "remove"


@dataclass(frozen=True)
class GalleryRows:
    """Every stored template at one ``gallery_version``, ready for an index build.

    vectors (n, 512) float32; owner (n,) int32 index into ``traveller_ids``;
    template_ids (n,) int64; valid_from / valid_to (t,) float64 per traveller.
    """

    gallery_version: int
    traveller_ids: list[str]
    valid_from: np.ndarray
    valid_to: np.ndarray
    owner: np.ndarray
    template_ids: np.ndarray
    vectors: np.ndarray


# -- input checks ------------------------------------------------------------------

def _check_sha256(s: object) -> str:
    if (not isinstance(s, str) or len(s) != 64
            or any(c not in "0123456789abcdef" for c in s)):
        raise InvalidInput("photo_sha256 must be 64 lowercase hex characters")
    return s


def _check_window(valid_from: datetime | float, valid_to: datetime | float
                  ) -> tuple[float, float]:
    """A booking window [valid_from, valid_to) as epoch seconds; it must not be empty."""
    vf, vt = to_epoch(valid_from, "valid_from"), to_epoch(valid_to, "valid_to")
    if not vf < vt:
        raise InvalidInput("valid_from must be before valid_to")
    return vf, vt


def _check_template_limit(traveller_id: str, count: int) -> None:
    if count > MAX_TEMPLATES_PER_TRAVELLER:
        raise InvalidInput(f"a traveller may have at most {MAX_TEMPLATES_PER_TRAVELLER}"
                           f" templates; {traveller_id!r} would have {count}")


def _new_photos(stored: set[str], photo_sha256s: Sequence[str]) -> dict[str, int]:
    """Photo sha256 -> its first row, for the photos not stored yet (a photo sent twice
    is stored once)."""
    new: dict[str, int] = {}
    for i, sha in enumerate(photo_sha256s):
        if sha not in stored and sha not in new:
            new[sha] = i
    return new


def stored_model_id(path: str | Path) -> str | None:
    """The model_id a store file was created for, read without opening it for writing."""
    path = Path(path)
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='model_id'").fetchone()
    except sqlite3.DatabaseError as e:
        raise GalleryError(f"{path.name} is not a readable gallery store ({e})") from None
    finally:
        conn.close()
    return row[0] if row else None


@dataclass(frozen=True)
class TravellerSummary:
    """A traveller without its templates: what a re-index run compares against."""

    traveller_id: str
    valid_from: float
    valid_to: float
    photo_sha256s: frozenset[str]


# -- the store --------------------------------------------------------------------------

class Store(StoreFile):
    """The traveller store: travellers, their templates and the change log, in one
    StoreFile (database.py: thread-safe; writes return only after COMMIT is fsynced)."""

    def __init__(self, path: str | Path, model_id: str, codec: TemplateCodec | None = None,
                 write_wait_s: float = DEFAULT_WRITE_WAIT_S, quick_check_s: float = 0.0
                 ) -> None:
        """``quick_check_s`` > 0: run ``PRAGMA quick_check`` first, for at most that long,
        and refuse a store that fails it (StoreDamaged) before anything else reads it."""
        self.codec: TemplateCodec = codec or PlainCodec()
        super().__init__(path, write_wait_s)
        try:
            if quick_check_s > 0:
                check_file(self, quick_check_s)
            with self._write_lock:
                migrate(self._conn, self.path)
            self._check_or_set_model(model_id)
            self.model_id = model_id
            store_id = self._meta("store_id")
            if store_id is None:  # written by the first migration: gone only from a damaged file
                raise GalleryError(f"{self.path}: the gallery store has lost its store_id; "
                                   "restore the store from a backup")
            self.store_id = store_id
        except BaseException as e:
            self.close()
            if isinstance(e, sqlite3.Error):
                raise storage_error(e, self.path) from None
            raise

    @classmethod
    def open(cls, path: str | Path, model_id: str, codec: TemplateCodec | None = None,
             write_wait_s: float = DEFAULT_WRITE_WAIT_S, quick_check_s: float = 0.0
             ) -> Store:
        return cls(path, model_id, codec, write_wait_s, quick_check_s)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta: model, schema and gallery versions -------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _check_or_set_model(self, model_id: str) -> None:
        with self._write_lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key='model_id'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('model_id', ?)", (model_id,))
            elif row[0] != model_id:
                raise GalleryError(
                    f"store {self.path.name} holds templates of model {row[0]}, but this "
                    f"service runs {model_id}; templates of different models are not "
                    f"comparable, re-enrol into a new store")

    @property
    def schema_version(self) -> int:
        return self._reader().execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    @property
    def gallery_version(self) -> int:
        return int(self._meta("gallery_version") or 0)

    # -- writes ---------------------------------------------------------------------

    @staticmethod
    def _version(c: sqlite3.Connection) -> int:
        """The gallery_version as seen by ``c``'s transaction."""
        return int(c.execute("SELECT value FROM meta WHERE key='gallery_version'"
                             ).fetchone()[0])

    @classmethod
    def _bump(cls, c: sqlite3.Connection, traveller_id: str, kind: str, now: float) -> int:
        version = cls._version(c) + 1
        c.execute("UPDATE meta SET value=? WHERE key='gallery_version'", (str(version),))
        c.execute("INSERT INTO changes VALUES (?, ?, ?, ?)", (version, traveller_id, kind, now))
        return version

    def _check_enrolment(self, e: Enrolment, allow_empty: bool = False) -> _Checked:
        """Validate one enrolment (no store access); raises InvalidInput / GalleryError.
        ``allow_empty``: no templates and no photos is valid too (a replacement that keeps
        only stored photos)."""
        traveller_id = check_traveller_id(e.traveller_id)
        if allow_empty and np.asarray(e.templates).size == 0 and not len(e.photo_sha256s):
            x = np.empty((0, EMBEDDING_DIM), np.float32)
        else:
            x = check_templates(e.templates)
        vf, vt = _check_window(e.valid_from, e.valid_to)
        shas = [_check_sha256(s) for s in e.photo_sha256s]
        if len(shas) != len(x):
            raise InvalidInput(f"got {len(x)} templates but {len(shas)} photo_sha256 values")
        if e.model_id is not None and e.model_id != self.model_id:
            raise GalleryError(f"templates made by model {e.model_id} cannot join a gallery "
                               f"of model {self.model_id}")
        return _Checked(traveller_id, x, vf, vt, shas)

    def _apply_enrolment(self, c: sqlite3.Connection, e: _Checked, now: float
                         ) -> EnrolResult:
        """Write one checked enrolment inside the caller's transaction."""
        healed = drop_quarantined(c, e.traveller_id, e.photo_sha256s)
        row = c.execute("SELECT valid_from, valid_to FROM travellers WHERE traveller_id=?",
                        (e.traveller_id,)).fetchone()
        stored = {r[0] for r in c.execute(
            "SELECT photo_sha256 FROM templates WHERE traveller_id=?", (e.traveller_id,))}
        new = _new_photos(stored, e.photo_sha256s)
        _check_template_limit(e.traveller_id, len(stored) + len(new))
        window_changed = row is None or (row[0], row[1]) != (e.valid_from, e.valid_to)
        if not new and not window_changed and not healed:
            return EnrolResult(e.traveller_id, self._version(c), 0, False)
        self._set_window(c, e.traveller_id, e.valid_from, e.valid_to, row is None, now)
        self._insert_templates(c, e.traveller_id, e.templates, new, now)
        version = self._bump(c, e.traveller_id, "enrol", now)
        return EnrolResult(e.traveller_id, version, len(new), True)

    @staticmethod
    def _set_window(c: sqlite3.Connection, traveller_id: str, vf: float, vt: float,
                    insert: bool, now: float) -> None:
        if insert:
            c.execute("INSERT INTO travellers VALUES (?, ?, ?, ?, ?)",
                      (traveller_id, vf, vt, now, now))
        else:
            c.execute("UPDATE travellers SET valid_from=?, valid_to=?, updated_at=? "
                      "WHERE traveller_id=?", (vf, vt, now, traveller_id))

    def _insert_templates(self, c: sqlite3.Connection, traveller_id: str, x: np.ndarray,
                          rows: dict[str, int], now: float) -> None:
        """Insert ``x[i]`` for each photo sha256 -> row i of ``rows``, with its checksum."""
        values = []
        for sha, i in rows.items():
            blob = self.codec.encode(x[i], row_context(traveller_id, sha))
            values.append((traveller_id, self.model_id, sha, self.codec.name, blob,
                           template_checksum(traveller_id, sha, self.codec.name, blob), now))
        c.executemany(
            "INSERT INTO templates (traveller_id, model_id, photo_sha256, codec, template,"
            " checksum, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", values)

    def enroll(self, traveller_id: str, templates: np.ndarray,
               valid_from: datetime | float, valid_to: datetime | float,
               photo_sha256s: Sequence[str], model_id: str | None = None,
               wait_s: float | None = None) -> EnrolResult:
        """Add templates (k, 512) float32 and set the booking window; durable on return.

        Idempotent: photos already stored for this traveller are skipped, and if nothing
        changes the gallery_version does not move. ``wait_s`` bounds the wait for the write
        lock (StoreBusy after it); a full disk raises DiskFull. Neither writes anything.
        """
        checked = self._check_enrolment(Enrolment(traveller_id, templates, valid_from,
                                                  valid_to, photo_sha256s, model_id))
        with self._write(wait_s) as c:
            result = self._apply_enrolment(c, checked, time.time())
        if result.changed:
            log.info("enrolled traveller (%d new templates) at gallery_version %d",
                     result.added_templates, result.gallery_version)
        return result

    def enroll_many(self, enrolments: Sequence[Enrolment]) -> list[EnrolResult]:
        """Enrol many travellers in ONE transaction; durable (fsynced) on return.

        Each enrolment behaves exactly as ``enroll`` would, in order: photos already
        stored are skipped, and each traveller that changes gets its own change-log entry
        and gallery_version (so snapshots replay it like single enrolments). Returns one
        EnrolResult per enrolment, in order, only after COMMIT.

        All or nothing: every enrolment is validated before anything is written, and a
        failure (InvalidInput naming the enrolment's position, a traveller over the
        template limit, a disk error) rolls the whole batch back. Nothing of a failed
        batch is acknowledged; the caller retries or reports it whole.
        """
        checked = []
        for n, e in enumerate(enrolments):
            try:
                checked.append(self._check_enrolment(e))
            except InvalidInput as exc:
                raise InvalidInput(f"enrolment {n} of {len(enrolments)} is refused, nothing "
                                   f"was written: {exc}") from None
        if not checked:
            return []
        now = time.time()
        with self._write() as c:
            results = [self._apply_enrolment(c, e, now) for e in checked]
        changed = [r for r in results if r.changed]
        log.info("enrolled %d travellers in one transaction (%d changed, %d new templates)"
                 " at gallery_version %d", len(results), len(changed),
                 sum(r.added_templates for r in changed), results[-1].gallery_version)
        return results

    def replace_templates(self, traveller_id: str, keep_sha256s: Sequence[str],
                          new_templates: np.ndarray, new_sha256s: Sequence[str],
                          valid_from: datetime | float, valid_to: datetime | float
                          ) -> EnrolResult:
        """Make a stored traveller's templates exactly ``keep`` + new, atomically.

        One transaction: stored templates whose photo is neither in ``keep_sha256s`` nor
        in ``new_sha256s`` are deleted (bytes overwritten, ``secure_delete``), the new
        templates (k, 512) float32 are added (k may be 0; a new photo already stored is
        kept, not stored twice) and the window is set. A concurrent reader sees the old
        templates or the new ones, never neither; a failure leaves the old ones.
        One change-log entry (kind ``enrol``: a snapshot replays a traveller by re-reading
        it whole) unless nothing changed. Durable on return.

        Raises UnknownTraveller if the traveller is not stored, InvalidInput if a kept
        photo is not stored for them, if nothing would be left (use ``remove``), or over
        the template limit.
        """
        traveller_id = check_traveller_id(traveller_id)
        keep = {_check_sha256(s) for s in keep_sha256s}
        checked = self._check_enrolment(Enrolment(traveller_id, new_templates, valid_from,
                                                  valid_to, new_sha256s), allow_empty=True)
        x, new_shas, vf, vt = (checked.templates, checked.photo_sha256s, checked.valid_from,
                               checked.valid_to)
        wanted = keep | set(new_shas)
        if not wanted:
            raise InvalidInput(f"replacing {traveller_id!r} would leave no template; "
                               f"remove the traveller instead")
        _check_template_limit(traveller_id, len(wanted))
        now = time.time()
        with self._write() as c:
            row = c.execute("SELECT valid_from, valid_to FROM travellers WHERE traveller_id=?",
                            (traveller_id,)).fetchone()
            if row is None:
                raise UnknownTraveller(f"traveller {traveller_id!r} is not in the gallery")
            stored = {r[0] for r in c.execute(
                "SELECT photo_sha256 FROM templates WHERE traveller_id=?", (traveller_id,))}
            missing = keep - stored
            if missing:
                raise InvalidInput(f"{len(missing)} of the photos to keep for "
                                   f"{traveller_id!r} are not stored for them")
            stale = stored - wanted
            new = _new_photos(stored, new_shas)
            if not stale and not new and (row[0], row[1]) == (vf, vt):
                return EnrolResult(traveller_id, self._version(c), 0, False)
            c.executemany("DELETE FROM templates WHERE traveller_id=? AND photo_sha256=?",
                          [(traveller_id, sha) for sha in stale])
            drop_quarantined(c, traveller_id)
            self._set_window(c, traveller_id, vf, vt, False, now)
            self._insert_templates(c, traveller_id, x, new, now)
            version = self._bump(c, traveller_id, "enrol", now)
        log.info("replaced templates of a traveller (%d deleted, %d new) at gallery_version "
                 "%d", len(stale), len(new), version)
        return EnrolResult(traveller_id, version, len(new), True)

    def remove(self, traveller_id: str, wait_s: float | None = None) -> int:
        """Delete the traveller and its template rows; returns the new gallery_version."""
        traveller_id = check_traveller_id(traveller_id)
        with self._write(wait_s) as c:
            if c.execute("DELETE FROM travellers WHERE traveller_id=?",
                         (traveller_id,)).rowcount == 0:
                raise UnknownTraveller(f"traveller {traveller_id!r} is not in the gallery")
            # ON DELETE CASCADE removes the templates; say it explicitly anyway so a
            # store opened without foreign_keys can never keep orphan biometric rows.
            c.execute("DELETE FROM templates WHERE traveller_id=?", (traveller_id,))
            c.execute("DELETE FROM quarantine WHERE traveller_id=?", (traveller_id,))
            version = self._bump(c, traveller_id, "remove", time.time())
        log.info("removed a traveller at gallery_version %d", version)
        return version

    # -- reads ----------------------------------------------------------------------

    def _decode(self, traveller_id: str, sha: str, codec: str, blob: bytes) -> np.ndarray:
        if codec != self.codec.name:
            raise GalleryError(f"a template is stored with codec {codec!r} but the store was "
                               f"opened with {self.codec.name!r}")
        return self.codec.decode(blob, row_context(traveller_id, sha))

    def get(self, traveller_id: str) -> Traveller:
        """One traveller with its intact templates (damaged ones quarantined, left out)."""
        return self.get_with_version(traveller_id)[0]

    def get_with_version(self, traveller_id: str) -> tuple[Traveller, int]:
        """``get``, and the gallery_version the traveller was read at (same transaction)."""
        traveller_id = check_traveller_id(traveller_id)
        with self._read() as c:  # one consistent read of the traveller and its templates
            version = self._version(c)
            row = c.execute("SELECT valid_from, valid_to, created_at, updated_at FROM travellers"
                            " WHERE traveller_id=?", (traveller_id,)).fetchone()
            rows = c.execute("SELECT template_id, photo_sha256, codec, template, model_id, "
                             "checksum FROM templates WHERE traveller_id=? ORDER BY "
                             "template_id", (traveller_id,)).fetchall()
            skip = quarantined_ids(c, traveller_id) if rows else set()
        if row is None:
            raise UnknownTraveller(f"traveller {traveller_id!r} is not in the gallery")
        good, damaged = [], []
        for r in rows:
            if r[0] in skip:
                continue
            problem = row_problem(traveller_id, r[1], r[2], r[3], r[5])
            if problem:
                damaged.append(DamagedRow(r[0], traveller_id, r[1], problem))
            else:
                good.append(r)
        quarantine(self, damaged)
        templates = np.stack([self._decode(traveller_id, r[1], r[2], r[3]) for r in good]) \
            if good else np.empty((0, EMBEDDING_DIM), np.float32)
        return Traveller(traveller_id, row[0], row[1], row[2], row[3], templates,
                         tuple(r[0] for r in good), tuple(r[1] for r in good), self.model_id,
                         len(good)), version

    def find(self, traveller_id: str) -> Traveller | None:
        try:
            return self.get(traveller_id)
        except UnknownTraveller:
            return None

    def list_travellers(self) -> list[TravellerSummary]:
        """Every traveller with window and photo digests, in one read; decodes no template.

        Photos of quarantined rows are left out, so a re-index run re-embeds them."""
        photos: dict[str, set[str]] = {}
        with self._read() as c:
            for tid, sha in c.execute("SELECT traveller_id, photo_sha256 FROM templates WHERE "
                                      "template_id NOT IN (SELECT template_id FROM quarantine)"):
                photos.setdefault(tid, set()).add(sha)
            rows = c.execute("SELECT traveller_id, valid_from, valid_to FROM travellers "
                             "ORDER BY traveller_id").fetchall()
        return [TravellerSummary(tid, vf, vt, frozenset(photos.get(tid, ())))
                for tid, vf, vt in rows]

    def counts(self) -> tuple[int, int]:
        """(travellers, templates)."""
        c = self._reader()
        return (c.execute("SELECT COUNT(*) FROM travellers").fetchone()[0],
                c.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

    def searchable_at(self, now: float) -> int:
        """Travellers a search at ``now`` looks at, as the index counts them (the N of a 1:N
        search): booking window open, and at least one intact (not quarantined) template."""
        return self._reader().execute(
            "SELECT COUNT(*) FROM travellers t WHERE valid_from <= ? AND ? < valid_to AND "
            "EXISTS (SELECT 1 FROM templates m WHERE m.traveller_id = t.traveller_id AND "
            "m.template_id NOT IN (SELECT template_id FROM quarantine))",
            (now, now)).fetchone()[0]

    def changes_since(self, gallery_version: int) -> list[Change]:
        return [Change(*r) for r in self._reader().execute(
            "SELECT gallery_version, traveller_id, kind FROM changes WHERE gallery_version > ? "
            "ORDER BY gallery_version", (gallery_version,))]

    def read_all(self, valid_after: float | None = None) -> GalleryRows:
        """Every intact template (of travellers whose booking ends after ``valid_after``, if
        given), read in one transaction so the rows match the gallery_version returned with
        them. Rows failing their checksum are quarantined and left out."""
        damaged: list[DamagedRow] = []
        with self._read() as c:
            version = self._version(c)
            cutoff = -math.inf if valid_after is None else valid_after
            travellers = c.execute("SELECT traveller_id, valid_from, valid_to FROM travellers "
                                   "WHERE valid_to > ? ORDER BY traveller_id",
                                   (cutoff,)).fetchall()
            slot = {t[0]: i for i, t in enumerate(travellers)}
            skip = quarantined_ids(c)
            n = c.execute("SELECT COUNT(*) FROM templates").fetchone()[0]
            vectors = np.empty((n, EMBEDDING_DIM), np.float32)
            owner = np.empty(n, np.int32)
            template_ids = np.empty(n, np.int64)
            m = 0
            for tid, trav, sha, codec, blob, checksum in c.execute(
                    "SELECT template_id, traveller_id, photo_sha256, codec, template, checksum "
                    "FROM templates ORDER BY template_id"):
                s = slot.get(trav)
                if s is None or tid in skip:
                    continue
                problem = row_problem(trav, sha, codec, blob, checksum)
                if problem:
                    damaged.append(DamagedRow(tid, trav, sha, problem))
                    continue
                vectors[m] = self._decode(trav, sha, codec, blob)
                owner[m] = s
                template_ids[m] = tid
                m += 1
        quarantine(self, damaged, wait_s=self.write_wait_s)
        return GalleryRows(version, [t[0] for t in travellers],
                           np.array([t[1] for t in travellers], np.float64),
                           np.array([t[2] for t in travellers], np.float64),
                           owner[:m], template_ids[:m], vectors[:m])
