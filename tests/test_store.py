"""The SQLite store: schema, idempotent enrolment, versions, deletion, codec hook, input checks."""
from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from synthetic import MODEL, sha, unit

from matcher.errors import GalleryError, InvalidInput, UnknownTraveller
from matcher.gallery.codecs import PlainCodec
from matcher.gallery.schema import SCHEMA_VERSION
from matcher.gallery.store import Enrolment, Store
from matcher.templates import MAX_TEMPLATES_PER_TRAVELLER


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "g.sqlite3", MODEL)
    yield s
    s.close()


T0 = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
T1 = T0 + timedelta(hours=12)


def test_schema_is_versioned_and_pragmas_are_durable(store, tmp_path):
    assert store.schema_version == SCHEMA_VERSION
    c = sqlite3.connect(tmp_path / "g.sqlite3")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in c.execute("SELECT version FROM schema_version")] == [1, 2]
    c.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_keeps_data_and_does_not_migrate_twice(tmp_path):
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((2, 512)))
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        store_id = s.store_id
        s.enroll("A1", x, T0, T1, [sha(1), sha(2)])
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        assert s.store_id == store_id
        assert s.gallery_version == 1
        t = s.get("A1")
        np.testing.assert_array_equal(t.templates, x)
        assert t.valid_from == T0.timestamp() and t.valid_to == T1.timestamp()
        assert t.photo_sha256s == (sha(1), sha(2))


def test_other_model_is_refused(tmp_path):
    Store.open(tmp_path / "g.sqlite3", MODEL).close()
    with pytest.raises(GalleryError, match="not comparable"):
        Store.open(tmp_path / "g.sqlite3", "other@1")


def test_reenrolling_the_same_photo_is_idempotent(store):
    x = unit(np.random.default_rng(2).standard_normal((1, 512)))
    first = store.enroll("A1", x, T0, T1, [sha(1)])
    again = store.enroll("A1", x, T0, T1, [sha(1)])
    assert first.changed and first.added_templates == 1 and first.gallery_version == 1
    assert not again.changed and again.added_templates == 0 and again.gallery_version == 1
    assert store.counts() == (1, 1)
    # a new window is a change, the same photo is still not stored twice
    moved = store.enroll("A1", x, T0, T1 + timedelta(hours=1), [sha(1)])
    assert moved.changed and moved.added_templates == 0 and moved.gallery_version == 2
    # a second photo adds a template
    y = unit(np.random.default_rng(3).standard_normal((1, 512)))
    assert store.enroll("A1", y, T0, T1 + timedelta(hours=1), [sha(2)]).added_templates == 1
    assert store.counts() == (1, 2)
    assert [c.gallery_version for c in store.changes_since(0)] == [1, 2, 3]
    assert [c.kind for c in store.changes_since(2)] == ["enrol"]


def test_remove_deletes_template_rows(store, tmp_path):
    x = unit(np.random.default_rng(4).standard_normal((3, 512)))
    store.enroll("A1", x, T0, T1, [sha(1), sha(2), sha(3)])
    store.enroll("B2", x[:1], T0, T1, [sha(9)])
    assert store.remove("A1") == 3
    assert store.counts() == (1, 1)
    assert store.find("A1") is None
    with pytest.raises(UnknownTraveller):
        store.get("A1")
    with pytest.raises(UnknownTraveller):
        store.remove("A1")
    assert store.changes_since(2)[0].kind == "remove"
    # the bytes are gone from the file too (secure_delete), once the WAL is checkpointed
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = (tmp_path / "g.sqlite3").read_bytes()
    assert x[1].tobytes() not in raw and x[2].tobytes() not in raw
    assert x[0].tobytes() in raw  # B2 still holds this one


class ReversingCodec:
    """Stands in for an encrypting codec: not plain bytes, bound to its row context."""

    name = "reverse-test"

    def encode(self, template, context):
        return context + PlainCodec().encode(template, context)[::-1]

    def decode(self, blob, context):
        if not blob.startswith(context):
            raise GalleryError("template does not belong to this row")
        return PlainCodec().decode(blob[len(context):][::-1], context)


def test_template_codec_hook(tmp_path):
    x = unit(np.random.default_rng(5).standard_normal((1, 512)))
    with Store.open(tmp_path / "g.sqlite3", MODEL, codec=ReversingCodec()) as s:
        s.enroll("A1", x, T0, T1, [sha(1)])
        np.testing.assert_array_equal(s.get("A1").templates, x)
        blob, codec = s._conn.execute("SELECT template, codec FROM templates").fetchone()
        assert codec == "reverse-test" and blob != x.tobytes()
        np.testing.assert_array_equal(s.read_all().vectors, x)
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        with pytest.raises(GalleryError, match="codec"):
            s.get("A1")


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there", "new\nline", None, 42])
def test_bad_traveller_ids_are_invalid_input(store, bad):
    x = unit(np.ones((1, 512)))
    with pytest.raises(InvalidInput, match="traveller_id"):
        store.enroll(bad, x, T0, T1, [sha(1)])


def test_bad_templates_and_windows_are_invalid_input(store):
    x = unit(np.ones((1, 512)))
    with pytest.raises(InvalidInput, match="float32"):
        store.enroll("A1", x.astype(np.float64), T0, T1, [sha(1)])
    with pytest.raises(InvalidInput, match="shape"):
        store.enroll("A1", np.ones((1, 128), np.float32), T0, T1, [sha(1)])
    with pytest.raises(InvalidInput, match="L2-normalised"):
        store.enroll("A1", x * 2, T0, T1, [sha(1)])
    nan = x.copy()
    nan[0, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        store.enroll("A1", nan, T0, T1, [sha(1)])
    with pytest.raises(InvalidInput, match="before"):
        store.enroll("A1", x, T1, T0, [sha(1)])
    with pytest.raises(InvalidInput, match="timezone"):
        store.enroll("A1", x, T0.replace(tzinfo=None), T1, [sha(1)])
    with pytest.raises(InvalidInput, match="sha256"):
        store.enroll("A1", x, T0, T1, ["not-a-hash"])
    with pytest.raises(InvalidInput, match="photo_sha256"):
        store.enroll("A1", x, T0, T1, [sha(1), sha(2)])
    assert store.counts() == (0, 0) and store.gallery_version == 0


def test_read_all_drops_ended_bookings_and_is_consistent(store):
    rng = np.random.default_rng(6)
    store.enroll("OLD", unit(rng.standard_normal((1, 512))), T0 - timedelta(days=2),
                 T0 - timedelta(days=1), [sha(1)])
    store.enroll("NOW", unit(rng.standard_normal((2, 512))), T0, T1, [sha(2), sha(3)])
    rows = store.read_all(valid_after=T0.timestamp())
    assert rows.gallery_version == 2
    assert rows.traveller_ids == ["NOW"]
    assert rows.vectors.shape == (2, 512) and list(rows.owner) == [0, 0]
    assert len(store.read_all().traveller_ids) == 2


# -- enroll_many: many travellers, one durable transaction ---------------------------------

def _enrolments(n: int, seed: int, offset: int = 0) -> list[Enrolment]:
    x = unit(np.random.default_rng(seed).standard_normal((n, 512)))
    return [Enrolment(f"B{offset + i:04d}", x[i], T0, T1, [sha(f"b{offset + i}")])
            for i in range(n)]


def test_enroll_many_is_durable_once_it_returns(tmp_path):
    batch = _enrolments(50, seed=10)
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        results = s.enroll_many(batch)
        # Committed: another connection (another process would see the same) reads it all.
        with sqlite3.connect(tmp_path / "g.sqlite3") as other:
            assert other.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 50
    assert [r.traveller_id for r in results] == [e.traveller_id for e in batch]
    assert all(r.changed and r.added_templates == 1 for r in results)
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        assert s.counts() == (50, 50) and s.gallery_version == 50
        t = s.get("B0007")
        np.testing.assert_array_equal(t.templates[0], batch[7].templates)
        assert (t.valid_from, t.valid_to) == (T0.timestamp(), T1.timestamp())
        assert t.photo_sha256s == (sha("b7"),)


def test_enroll_many_bumps_one_version_per_changed_traveller(store):
    first = _enrolments(3, seed=11)
    store.enroll_many(first)
    assert store.gallery_version == 3
    y = unit(np.random.default_rng(12).standard_normal((1, 512)))
    batch = [first[0],                                          # unchanged: no bump
             Enrolment("B0001", y, T0, T1, [sha("extra")]),     # a new photo
             Enrolment("B0002", first[2].templates, T0, T1 + timedelta(hours=1),
                       first[2].photo_sha256s),                 # only the window moved
             *_enrolments(1, seed=13, offset=3)]                # a new traveller
    results = store.enroll_many(batch)
    assert [r.changed for r in results] == [False, True, True, True]
    assert [r.gallery_version for r in results] == [3, 4, 5, 6]
    assert [r.added_templates for r in results] == [0, 1, 0, 1]
    changes = store.changes_since(3)
    assert [(c.gallery_version, c.traveller_id, c.kind) for c in changes] == [
        (4, "B0001", "enrol"), (5, "B0002", "enrol"), (6, "B0003", "enrol")]
    assert store.counts() == (4, 5)


def test_enroll_many_is_idempotent(store):
    batch = _enrolments(20, seed=14)
    store.enroll_many(batch)
    again = store.enroll_many(batch)  # e.g. a resumed run re-sending a committed batch
    assert not any(r.changed for r in again)
    assert {r.gallery_version for r in again} == {20}
    assert store.counts() == (20, 20) and store.gallery_version == 20
    # The same traveller twice in one batch: the second sees the first, as in a sequence.
    twice = _enrolments(1, seed=15, offset=100)
    assert [r.changed for r in store.enroll_many(twice * 2)] == [True, False]
    assert store.counts() == (21, 21)


def test_enroll_many_refuses_the_whole_batch_for_one_bad_record(store):
    batch = _enrolments(5, seed=16)
    bad = Enrolment("B0002", batch[2].templates * 2, T0, T1, batch[2].photo_sha256s)
    with pytest.raises(InvalidInput, match=r"enrolment 2 of 5 .*L2-normalised"):
        store.enroll_many([*batch[:2], bad, *batch[3:]])
    assert store.counts() == (0, 0) and store.gallery_version == 0
    # A check that needs the stored rows (template limit) fails inside the transaction:
    # rolled back whole, nothing of the batch is acknowledged.
    x = unit(np.random.default_rng(17).standard_normal((17, 512)))
    over = Enrolment("FULL", x, T0, T1, [sha(f"f{i}") for i in range(17)])
    with pytest.raises(InvalidInput, match="at most 16"):
        store.enroll_many([*batch, over])
    assert store.counts() == (0, 0) and store.gallery_version == 0
    assert store.enroll_many([]) == []


# -- replace_templates: a changed booking photo, atomically --------------------------------

def test_replace_templates_swaps_photos_in_one_transaction(store, tmp_path):
    rng = np.random.default_rng(18)
    old = unit(rng.standard_normal((3, 512)))
    new = unit(rng.standard_normal((2, 512)))
    store.enroll("A1", old, T0, T1, [sha(1), sha(2), sha(3)])
    r = store.replace_templates("A1", [sha(1)], new, [sha(4), sha(5)], T0,
                                T1 + timedelta(days=1))
    assert r.changed and r.added_templates == 2 and r.gallery_version == 2
    t = store.get("A1")
    assert t.photo_sha256s == (sha(1), sha(4), sha(5))
    np.testing.assert_array_equal(t.templates, np.vstack([old[:1], new]))
    assert t.valid_to == (T1 + timedelta(days=1)).timestamp()
    assert [c.kind for c in store.changes_since(1)] == ["enrol"]  # one change, replayable
    # The same replace again changes nothing; a window-only replace needs no template.
    assert not store.replace_templates("A1", [sha(1)], new, [sha(4), sha(5)], T0,
                                       T1 + timedelta(days=1)).changed
    moved = store.replace_templates("A1", [sha(1), sha(4), sha(5)],
                                    np.empty((0, 512), np.float32), [], T0, T1)
    assert moved.changed and moved.added_templates == 0 and store.gallery_version == 3
    assert store.get("A1").valid_to == T1.timestamp()
    # Deleted template bytes are gone from the file (secure_delete), after a checkpoint.
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = (tmp_path / "g.sqlite3").read_bytes()
    assert old[1].tobytes() not in raw and old[2].tobytes() not in raw
    assert old[0].tobytes() in raw and new[0].tobytes() in raw


def test_replace_templates_refuses_what_it_cannot_do(store):
    x = unit(np.random.default_rng(19).standard_normal((2, 512)))
    with pytest.raises(UnknownTraveller):
        store.replace_templates("NOBODY", [], x[:1], [sha(1)], T0, T1)
    store.enroll("A1", x[:1], T0, T1, [sha(1)])
    with pytest.raises(InvalidInput, match="not stored"):
        store.replace_templates("A1", [sha(9)], x[1:], [sha(2)], T0, T1)
    with pytest.raises(InvalidInput, match="remove the traveller"):
        store.replace_templates("A1", [], np.empty((0, 512), np.float32), [], T0, T1)
    with pytest.raises(InvalidInput, match="L2-normalised"):
        store.replace_templates("A1", [], x[1:] * 2, [sha(2)], T0, T1)
    # the window and template limit are enrolment's, with or without new photos
    none = np.empty((0, 512), np.float32)
    with pytest.raises(InvalidInput, match="valid_from must be before valid_to"):
        store.replace_templates("A1", [sha(1)], none, [], T1, T0)
    with pytest.raises(InvalidInput, match="valid_from must be before valid_to"):
        store.replace_templates("A1", [], x[1:], [sha(2)], T1, T0)
    many = np.repeat(x[1:], MAX_TEMPLATES_PER_TRAVELLER, axis=0)
    with pytest.raises(InvalidInput, match=f"would have {MAX_TEMPLATES_PER_TRAVELLER + 1}"):
        store.replace_templates("A1", [sha(1)], many,
                                [sha(100 + i) for i in range(MAX_TEMPLATES_PER_TRAVELLER)],
                                T0, T1)
    assert store.gallery_version == 1 and store.get("A1").photo_sha256s == (sha(1),)


class FailingCodec(ReversingCodec):
    """Fails to encode one given photo: a failure in the middle of a replace."""

    def __init__(self, failing_sha: str) -> None:
        self.failing = failing_sha.encode()

    def encode(self, template, context):
        if context.endswith(self.failing):
            raise GalleryError("key store unavailable")
        return super().encode(template, context)


def test_a_failed_replace_leaves_the_old_templates(tmp_path):
    x = unit(np.random.default_rng(20).standard_normal((3, 512)))
    with Store.open(tmp_path / "g.sqlite3", MODEL, codec=FailingCodec(sha(3))) as s:
        s.enroll("A1", x[:1], T0, T1, [sha(1)])
        # The old photo's template is deleted first in the transaction; the second new
        # template then fails to encode: nothing of it may be visible.
        with pytest.raises(GalleryError, match="key store"):
            s.replace_templates("A1", [], x[1:], [sha(2), sha(3)], T0, T1)
        t = s.get("A1")
        assert t.photo_sha256s == (sha(1),) and s.gallery_version == 1
        np.testing.assert_array_equal(t.templates, x[:1])


def test_a_concurrent_reader_never_sees_a_traveller_without_templates(tmp_path):
    """One thread alternates the traveller's photo between two templates; another, on its
    own connection, reads them all the while: always exactly the old or the new one."""
    x = unit(np.random.default_rng(21).standard_normal((2, 512)))
    seen: list[tuple[str, ...]] = []
    problems: list[str] = []
    with Store.open(tmp_path / "g.sqlite3", MODEL) as s:
        s.enroll("A1", x[:1], T0, T1, [sha(0)])
        stop, reading = threading.Event(), threading.Event()

        def reader() -> None:
            with Store.open(tmp_path / "g.sqlite3", MODEL) as other:
                while not stop.is_set():
                    t = other.find("A1")
                    reading.set()
                    if t is None or len(t.photo_sha256s) != 1:
                        problems.append("none" if t is None else f"{len(t.photo_sha256s)}")
                        continue
                    i = int(t.photo_sha256s[0] == sha(1))
                    if not np.array_equal(t.templates[0], x[i]):
                        problems.append("template does not match its photo")
                    seen.append(t.photo_sha256s)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            assert reading.wait(30)
            # At least 60 swaps, and on until the reader has seen both photos.
            for n in range(1, 2001):
                i = n % 2
                s.replace_templates("A1", [], x[i:i + 1], [sha(i)], T0, T1)
                if n >= 60 and len(set(seen)) == 2:
                    break
        finally:
            stop.set()
            thread.join(30)
        version = s.gallery_version
    assert not problems, problems[:5]
    assert version == 1 + n  # one change per replace
    assert len(set(seen)) == 2  # the reader really saw both states
