"""``matcher gallery stats|export-snapshot|verify-snapshot`` on a real store."""
from __future__ import annotations

import argparse
import json
import time

import pytest
from synthetic import MODEL, enrol_each, templates

from matcher.cli.gallery import add_parser
from matcher.gallery.primary import PrimaryGallery

# `gallery stats` counts the travellers booked at the wall clock's now.
HOUR, DAY = 3600.0, 86400.0


def run(argv, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    run.err = captured.err
    return code, captured.out


@pytest.fixture
def data_dir(tmp_path):
    """T0..T10 (T11 enrolled, then removed): the even ones booked now, the odd ones from
    tomorrow, so 6 of the 11 are searchable now and every one is in a snapshot."""
    now = time.time()
    windows = [(now - HOUR, now + DAY) if i % 2 == 0 else (now + DAY, now + 2 * DAY)
               for i in range(12)]
    with PrimaryGallery.open(tmp_path / "g", MODEL) as g:
        enrol_each(g, templates(12), windows)
        g.remove("T11")
    return tmp_path / "g"


def test_export_then_stats_then_verify(data_dir, capsys):
    code, out = run(["gallery", "export-snapshot", "--data", str(data_dir)], capsys)
    exported = json.loads(out)
    assert code == 0 and exported["gallery_version"] == 13 and exported["travellers"] == 11
    code, out = run(["gallery", "stats", "--data", str(data_dir)], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["model_id"] == MODEL
    assert (stats["travellers"], stats["templates"], stats["gallery_version"]) == (11, 11, 13)
    assert stats["searchable_now"] == 6
    assert stats["snapshots"][0]["ok"] and stats["snapshots"][0]["behind"] == 0

    snap = exported["snapshot"]
    code, out = run(["gallery", "verify-snapshot", "--data", str(data_dir), snap], capsys)
    assert code == 0 and out.startswith("ok:") and "11 travellers" in out
    with open(f"{snap}/windows.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    code, out = run(["gallery", "verify-snapshot", snap], capsys)
    assert code == 1 and "REFUSED" in out and "checksum" in out
    code, out = run(["gallery", "stats", "--data", str(data_dir)], capsys)
    assert not json.loads(out)["snapshots"][0]["ok"]


def test_stats_counts_searchable_now_as_a_search_does(data_dir, capsys):
    """`gallery stats` gives the N the 1:N threshold is taken at (PrimaryGallery.searchable,
    what GetGalleryInfo reports): a traveller booked now whose only template is damaged
    is not searched, so not counted, whether the index comes from the store or a snapshot."""
    import sqlite3

    from matcher.gallery.primary import STORE_FILE

    run(["gallery", "export-snapshot", "--data", str(data_dir)], capsys)
    with sqlite3.connect(data_dir / STORE_FILE) as c:   # T0 (booked now): its one row rots
        c.execute("UPDATE templates SET template = zeroblob(2048) WHERE traveller_id='T0'")
    code, out = run(["gallery", "stats", "--data", str(data_dir)], capsys)
    stats = json.loads(out)
    assert [q["traveller_id"] for q in stats["quarantined"]] == ["T0"]
    assert stats["searchable_now"] == 5
    for use_snapshots in (True, False):
        with PrimaryGallery.open(data_dir, MODEL, use_snapshots=use_snapshots) as g:
            assert g.searchable() == stats["searchable_now"], use_snapshots


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    code, _ = run(["gallery", "stats", "--data", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no gallery store" in run.err


def test_the_old_data_dir_spelling_still_works(data_dir, capsys):
    code, out = run(["gallery", "stats", "--data-dir", str(data_dir)], capsys)
    assert code == 0 and json.loads(out)["travellers"] == 11


def test_export_offers_every_index_kind(data_dir, capsys):
    code, out = run(["gallery", "export-snapshot", "--data", str(data_dir),
                     "--index-kind", "binary"], capsys)
    assert code == 0 and json.loads(out)["index_kind"] == "binary"
