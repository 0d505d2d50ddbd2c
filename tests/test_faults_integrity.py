"""Damaged files on a real disk: rotted template rows, a damaged store, snapshot or audit log.

Bytes are flipped in the files themselves (not through SQL), as a failing disk would.
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import MODEL, NOW, WINDOW, sha, unit

from matcher.cli.gallery import add_parser
from matcher.errors import StoreDamaged
from matcher.gallery.integrity import integrity_check, quarantined
from matcher.gallery.primary import STORE_FILE, PrimaryGallery
from matcher.gallery.schema import MIGRATIONS, SCHEMA_VERSION
from matcher.gallery.store import Store

REPO = Path(__file__).resolve().parents[1]


def _templates(n: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, 512)))


def _gallery(data: Path, x: np.ndarray) -> None:
    with PrimaryGallery.open(data, MODEL) as g:
        for i, t in enumerate(x):
            g.enroll(f"T{i}", t, *WINDOW, [sha(i)])
    # Closing the last connection checkpoints the WAL: the rows are in the main file now.


def _flip_in_file(path: Path, needle: bytes, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "the bytes to damage are not in the file"
    data[at + offset] ^= 0x40
    path.write_bytes(bytes(data))


def _top(g: PrimaryGallery, probe: np.ndarray) -> str | None:
    found = g.search(probe, k=1, now=NOW)[0]
    return found[0].traveller_id if found else None


def _stats(data: Path, capsys) -> dict:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gallery", "stats", "--data", str(data),
                              "--model-id", MODEL])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_a_rotted_template_row_is_quarantined_listed_and_healed_by_re_enrolment(tmp_path,
                                                                               capsys):
    data = tmp_path / "g"
    x = _templates(4)
    _gallery(data, x)
    _flip_in_file(data / STORE_FILE, x[1].tobytes())

    stats = _stats(data, capsys)
    assert [(q["traveller_id"], q["reason"]) for q in stats["quarantined"]] == \
        [("T1", "checksum mismatch")]
    with PrimaryGallery.open(data, MODEL) as g:
        assert _top(g, x[1][None]) != "T1"          # never searched
        assert _top(g, x[2][None]) == "T2"          # the others are
        assert len(g.get("T1").templates) == 0      # nor used for 1:1
        assert [d["traveller_id"] for d in g.stats()["quarantined"]] == ["T1"]
        g.enroll("T1", x[1], *WINDOW, [sha(1)])     # the booking photo again heals it
        assert _top(g, x[1][None]) == "T1"
        assert g.stats()["quarantined"] == []
    assert integrity_check(Store(data / STORE_FILE, MODEL)) == "ok"


def test_a_blob_swapped_between_rows_is_caught_by_the_row_binding(tmp_path):
    data = tmp_path / "g"
    x = _templates(3, seed=1)
    _gallery(data, x)
    with sqlite3.connect(data / STORE_FILE) as c:
        (a,), (b,) = c.execute("SELECT template FROM templates WHERE traveller_id IN "
                               "('T0', 'T1') ORDER BY traveller_id")
        c.execute("UPDATE templates SET template=? WHERE traveller_id='T0'", (b,))
        c.execute("UPDATE templates SET template=? WHERE traveller_id='T1'", (a,))
    with PrimaryGallery.open(data, MODEL) as g:
        assert sorted(d["traveller_id"] for d in g.stats()["quarantined"]) == ["T0", "T1"]
        assert _top(g, x[0][None]) not in ("T0", "T1")
        assert _top(g, x[2][None]) == "T2"


def test_rows_are_checked_when_the_index_comes_from_a_snapshot(tmp_path):
    data = tmp_path / "g"
    x = _templates(4, seed=2)
    _gallery(data, x)
    with PrimaryGallery.open(data, MODEL) as g:
        g.export_snapshot()
    _flip_in_file(data / STORE_FILE, x[3].tobytes())
    with PrimaryGallery.open(data, MODEL) as g:
        assert g.version == 4  # served from the snapshot, which holds T3's true template
        assert _top(g, x[3][None]) != "T3"  # yet the damaged row's traveller is not searched
        assert [d["traveller_id"] for d in g.stats()["quarantined"]] == ["T3"]


def test_migration_gives_existing_rows_checksums_and_quarantines_implausible_ones(tmp_path):
    db = tmp_path / STORE_FILE
    x = _templates(2, seed=3)
    bad = np.full(512, np.nan, np.float32)  # rotted before the upgrade: not a template
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
    for sql in MIGRATIONS[0][1]:
        c.execute(sql)
    c.executescript(f"""
        INSERT INTO schema_version VALUES (1, 0);
        INSERT INTO meta VALUES ('gallery_version', '3'), ('store_id', 'abc'),
                                ('model_id', '{MODEL}');""")
    for i, t in enumerate([x[0], x[1], bad]):
        c.execute("INSERT INTO travellers VALUES (?, ?, ?, 0, 0)", (f"T{i}", *WINDOW))
        c.execute("INSERT INTO templates (traveller_id, model_id, photo_sha256, codec, "
                  "template, created_at) VALUES (?, ?, ?, 'plain', ?, 0)",
                  (f"T{i}", MODEL, sha(i), t.astype("<f4").tobytes()))
    c.commit()
    c.close()
    with Store(db, MODEL) as store:
        assert store.schema_version == SCHEMA_VERSION
        rows = store.read_all()
        assert sorted(rows.traveller_ids[o] for o in rows.owner) == ["T0", "T1"]
        np.testing.assert_array_equal(store.get("T0").templates[0], x[0])
        assert [(d.traveller_id, d.reason.split(" ")[0]) for d in quarantined(store)] == \
            [("T2", "no")]


def test_a_structurally_damaged_store_is_refused_with_the_file_and_the_way_back(tmp_path):
    data = tmp_path / "g"
    _gallery(data, _templates(40, seed=4))
    db = data / STORE_FILE
    raw = bytearray(db.read_bytes())
    raw[4096 + 8:4096 + 2000] = b"\xa5" * 1992  # the b-tree page after the header page
    db.write_bytes(bytes(raw))
    with pytest.raises(StoreDamaged) as info:
        PrimaryGallery.open(data, MODEL)
    message = str(info.value)
    assert str(db) in message and "matcher reindex" in message and "--replica-of" in message

    db.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(StoreDamaged, match="is damaged"):
        PrimaryGallery.open(data, MODEL)


def test_a_damaged_snapshot_is_not_served_and_the_log_names_it(tmp_path, caplog):
    data = tmp_path / "g"
    x = _templates(3, seed=5)
    _gallery(data, x)
    with PrimaryGallery.open(data, MODEL) as g:
        path = g.export_snapshot()
    positions = path / "positions.npy"
    raw = bytearray(positions.read_bytes())
    raw[-1] ^= 1
    positions.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, logger="matcher.gallery.primary"):
        with PrimaryGallery.open(data, MODEL) as g:
            assert _top(g, x[1][None]) == "T1"  # built from the store instead
    text = caplog.text
    assert str(path) in text and "verify-snapshot" in text and "export-snapshot" in text


def _serve(data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matcher.cli", "serve", "--listen",
                           "127.0.0.1:0", "--metrics-listen", "off", "--data", str(data)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def test_matcher_serve_refuses_a_damaged_store_or_audit_log_in_one_clear_line(tmp_path):
    data = tmp_path / "g"
    _gallery(data, _templates(30, seed=6))
    audit = data / "audit.log"
    from matcher.service.audit import AuditLog

    with AuditLog(audit) as log:
        for i in range(3):
            log.append("enrol", traveller_id=f"T{i}", gallery_version=i + 1)
    raw = bytearray(audit.read_bytes())
    raw[-20] ^= 0x01  # inside the last record's hash
    audit.write_bytes(bytes(raw))
    done = _serve(data)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"audit log {audit}" in done.stderr and "matcher audit verify" in done.stderr

    audit.unlink()
    db = data / STORE_FILE
    raw = bytearray(db.read_bytes())
    raw[4096 + 8:4096 + 2000] = b"\xa5" * 1992
    db.write_bytes(bytes(raw))
    done = _serve(data)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"gallery store {db} is damaged" in done.stderr
