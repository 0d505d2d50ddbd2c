"""The bookings manifest: every bad row becomes a reject with a stable reason, never a crash."""
from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import pytest

from matcher.reindex.manifest import (
    ManifestError,
    load_manifest,
    parse_instant,
    photo_path,
    read_rows,
)
from matcher.templates import MAX_TEMPLATES_PER_TRAVELLER

NOW = datetime(2026, 11, 25, 22, 0, tzinfo=UTC).timestamp()


def _epoch(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def _write_csv(path: Path, rows: list[list[str]],
               header: tuple[str, ...] = ("traveller_id", "photo", "valid_from", "valid_to")
               ) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_good_rows_resolve_paths_uris_and_windows(tmp_path: Path) -> None:
    m = load_manifest(_write_csv(tmp_path / "m.csv", [
        ["A-1", "photos/a.jpg", "2026-11-26", "2026-11-26"],
        ["B-2", "file:///srv/photos/b%20c.jpg", "2026-11-26T06:00:00+05:00",
         "2026-11-26T18:00:00Z"],
        ["C-3", "/abs/c.png", "2026-11-26T06:00:00", "2026-11-27 06:00:00"],
    ]), NOW)
    assert not m.rejects and m.rows == 3
    a, b, c = m.bookings
    assert (a.row, a.traveller_id, a.photo) == (1, "A-1", tmp_path / "photos/a.jpg")
    # A date-only valid_to covers the whole day: the window is half-open.
    assert (a.valid_from, a.valid_to) == (_epoch(2026, 11, 26), _epoch(2026, 11, 27))
    assert b.photo == Path("/srv/photos/b c.jpg")
    assert (b.valid_from, b.valid_to) == (_epoch(2026, 11, 26, 1), _epoch(2026, 11, 26, 18))
    # Naive times are UTC.
    assert (c.valid_from, c.valid_to) == (_epoch(2026, 11, 26, 6), _epoch(2026, 11, 27, 6))


@pytest.mark.parametrize("row, reason", [
    (["", "a.jpg", "2026-11-26", "2026-11-27"], "invalid_row:traveller_id"),
    (["bad\x07id", "a.jpg", "2026-11-26", "2026-11-27"], "invalid_row:traveller_id"),
    (["x" * 200, "a.jpg", "2026-11-26", "2026-11-27"], "invalid_row:traveller_id"),
    (["A", "", "2026-11-26", "2026-11-27"], "invalid_row:photo"),
    (["A", "s3://bucket/a.jpg", "2026-11-26", "2026-11-27"], "invalid_row:photo"),
    (["A", "file://otherhost/a.jpg", "2026-11-26", "2026-11-27"], "invalid_row:photo"),
    (["A", "a.jpg", "tomorrow", "2026-11-27"], "invalid_row:valid_from"),
    (["A", "a.jpg", "2026-11-26", "2026-13-01"], "invalid_row:valid_to"),
    (["A", "a.jpg", "", "2026-11-27"], "invalid_row:valid_from"),
    (["A", "a.jpg", "2026-11-28", "2026-11-27"], "invalid_row:window_ends_before_it_starts"),
])
def test_bad_rows_are_rejected_with_the_field_named(tmp_path: Path, row: list[str],
                                                    reason: str) -> None:
    good = ["OK", "ok.jpg", "2026-11-26", "2026-11-27"]
    m = load_manifest(_write_csv(tmp_path / "m.csv", [good, row, good]), NOW)
    assert [(r.row, r.reason) for r in m.rejects] == [(2, reason)]
    assert [b.row for b in m.bookings] == [1]  # row 3 repeats row 1: one photo
    assert m.duplicates == 1
    assert m.rejects[0].code == "invalid_row"


def test_conflicting_windows_reject_every_row_of_that_traveller(tmp_path: Path) -> None:
    m = load_manifest(_write_csv(tmp_path / "m.csv", [
        ["A", "a1.jpg", "2026-11-26", "2026-11-27"],
        ["B", "b.jpg", "2026-11-26", "2026-11-27"],
        ["A", "a2.jpg", "2026-11-26", "2026-11-28"],
        ["C", "c1.jpg", "2026-11-26", "2026-11-27"],
        ["C", "c2.jpg", "2026-11-26", "2026-11-27"],
    ]), NOW)
    assert [(r.row, r.traveller_id, r.reason) for r in m.rejects] == [
        (1, "A", "conflicting_booking"), (3, "A", "conflicting_booking")]
    # Same window twice is two photos of one traveller, both kept.
    assert [(b.row, b.traveller_id) for b in m.bookings] == [(2, "B"), (4, "C"), (5, "C")]


def test_too_many_photos_and_expired_bookings(tmp_path: Path) -> None:
    rows = [["A", f"a{i}.jpg", "2026-11-26", "2026-11-27"]
            for i in range(MAX_TEMPLATES_PER_TRAVELLER + 2)]
    rows.append(["OLD", "old.jpg", "2026-11-01", "2026-11-24"])
    m = load_manifest(_write_csv(tmp_path / "m.csv", rows), NOW)
    assert len(m.bookings) == MAX_TEMPLATES_PER_TRAVELLER
    assert [r.reason for r in m.rejects] == ["too_many_photos"] * 2
    assert [b.traveller_id for b in m.expired] == ["OLD"]


def test_parquet_manifest_with_typed_columns(tmp_path: Path) -> None:
    from datetime import date

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "traveller_id": pa.array([1001, 1002], pa.int64()),
        "photo": ["a.jpg", "b.jpg"],
        "valid_from": pa.array([date(2026, 11, 26), date(2026, 11, 26)], pa.date32()),
        "valid_to": pa.array([datetime(2026, 11, 27, 12), datetime(2026, 11, 26)],
                             pa.timestamp("s")),
        "extra": ["ignored", "ignored"],
    }), path)
    m = load_manifest(path, NOW)
    assert [(b.traveller_id, b.valid_to) for b in m.bookings] == [
        ("1001", _epoch(2026, 11, 27, 12))]
    assert [(r.row, r.reason) for r in m.rejects] == [
        (2, "invalid_row:window_ends_before_it_starts")]


def test_a_spreadsheet_bom_and_spaced_header_are_read(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("\ufefftraveller_id, photo ,valid_from,valid_to\nA,a.jpg,2026-11-26,"
                     "2026-11-27\n".encode())
    assert [b.traveller_id for b in load_manifest(path, NOW).bookings] == ["A"]


def test_unreadable_manifests_raise(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.csv", NOW)
    with pytest.raises(ManifestError, match="lacks column"):
        load_manifest(_write_csv(tmp_path / "m.csv", [], header=("traveller_id", "photo")),
                      NOW)
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(ManifestError, match="unknown format"):
        read_rows(tmp_path / "m.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_rows(tmp_path / "bad.parquet")


def test_instants_and_paths() -> None:
    assert parse_instant("2026-11-26", end_of_day=True) == _epoch(2026, 11, 27)
    assert parse_instant("2026-11-26T00:00:00Z", end_of_day=True) == _epoch(2026, 11, 26)
    with pytest.raises(ValueError):
        parse_instant(12.5, end_of_day=False)
    assert photo_path("file://localhost/x/y.jpg", Path("/base")) == Path("/x/y.jpg")
    assert photo_path("rel/y.jpg", Path("/base")) == Path("/base/rel/y.jpg")
    with pytest.raises(ValueError):
        photo_path("https://example.org/y.jpg", Path("/base"))


def test_a_stray_non_utf8_byte_spoils_only_its_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"traveller_id,photo,valid_from,valid_to\n"
                     b"A,a.jpg,2026-11-26,2026-11-27\n"
                     b"B\xe9,b.jpg,2026-11-26,2026-11-27\n"
                     b"C,caf\xe9.jpg,2026-11-26,2026-11-27\n")
    m = load_manifest(path, NOW)
    assert [(r.row, r.traveller_id, r.reason) for r in m.rejects] == [
        (2, "B?", "invalid_row:traveller_id")]
    assert [b.traveller_id for b in m.bookings] == ["A", "C"]
    # The path keeps its original bytes, so it names the file on disk.
    assert bytes(m.bookings[1].photo) == bytes(tmp_path) + b"/caf\xe9.jpg"
