"""The SQLite store: schema, idempotent enrolment, versions, deletion, codec hook, input checks."""
from __future__ import annotations

import hashlib
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from matcher.errors import GalleryError, InvalidInput, UnknownTraveller
from matcher.store import SCHEMA_VERSION, PlainCodec, Store

MODEL = "test-model@000000000000"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def sha(i: object) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "g.sqlite3", MODEL)
    yield s
    s.close()


T0 = datetime(2026, 11, 25, 6, 0, tzinfo=timezone.utc)
T1 = T0 + timedelta(hours=12)


def test_schema_is_versioned_and_pragmas_are_durable(store, tmp_path):
    assert store.schema_version == SCHEMA_VERSION
    c = sqlite3.connect(tmp_path / "g.sqlite3")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in c.execute("SELECT version FROM schema_version")] == [1]
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
