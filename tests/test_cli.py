"""The ``matcher`` command: embed --json and compare through a real subprocess, the lazy
command table, and ``--data`` on every command that takes a data directory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matcher.cli import COMMANDS, build_parser, main
from matcher.face.pipeline import Pipeline, largest_face

REPO = Path(__file__).resolve().parents[1]


def _matcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matcher.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_embed_json_prints_one_object_per_face(faces_dir: Path, pipeline: Pipeline) -> None:
    files = [faces_dir / "obama_small.jpg", faces_dir / "group_two_people.jpg"]
    proc = _matcher("embed", "--json", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [(Path(r["file"]).name, r["face_index"]) for r in records] == [
        ("obama_small.jpg", 0), ("group_two_people.jpg", 0), ("group_two_people.jpg", 1)]
    for r in records:
        assert {"file", "face_index", "bbox", "kps", "det_score", "quality",
                "embedding"} <= set(r)
        assert len(r["bbox"]) == 4 and np.asarray(r["kps"]).shape == (5, 2)
        assert 0.5 <= r["det_score"] <= 1.0
        assert r["quality"]["accepted"] in (True, False) and "reasons" in r["quality"]
        embedding = np.asarray(r["embedding"], dtype=np.float64)
        assert embedding.shape == (512,)
        assert abs(np.linalg.norm(embedding) - 1.0) < 1e-4
    # The printed template is the one the library computes for the same file.
    expected = largest_face(pipeline.analyse_bytes(files[0].read_bytes())).template
    assert float(np.asarray(records[0]["embedding"]) @ expected) > 0.9999


def test_embed_reports_a_bad_file_and_carries_on(faces_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not_a_photo.jpg"
    bad.write_bytes(b"this is a text file with a .jpg name")
    proc = _matcher("embed", str(bad), str(faces_dir / "obama_small.jpg"))
    assert proc.returncode == 1
    assert "not_a_photo.jpg" in proc.stderr and "not a JPEG, PNG, WebP" in proc.stderr
    assert "Traceback" not in proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "embedding" not in record  # only with --json


@pytest.mark.parametrize("a, b, low, high", [
    ("obama_exif_rotated.jpg", "obama_4.jpg", 0.99, 1.0),
    ("obama_1.jpg", "biden_2.jpg", -1.0, 0.20),
])
def test_compare_prints_the_cosine_of_the_largest_faces(faces_dir: Path, a: str, b: str,
                                                        low: float, high: float) -> None:
    proc = _matcher("compare", str(faces_dir / a), str(faces_dir / b))
    assert proc.returncode == 0, proc.stderr
    score = float(proc.stdout.strip())
    assert low <= score <= high


def test_compare_without_a_face_fails_cleanly(faces_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    wall = tmp_path / "wall.png"
    y, x = np.mgrid[0:240, 0:320]
    Image.fromarray(np.stack([x % 256, y % 256, (x * y) % 256], 2).astype(np.uint8)).save(wall)
    proc = _matcher("compare", str(wall), str(faces_dir / "obama_4.jpg"))
    assert proc.returncode == 1
    assert "no face found" in proc.stderr and "Traceback" not in proc.stderr


def test_embed_survives_every_kind_of_bad_file(faces_dir: Path, tmp_path: Path) -> None:
    """Broken, hostile and unsupported files in one run: each is reported, none kills the
    process (a crash would show as a negative return code or a traceback)."""
    import io
    import struct
    import zlib

    from PIL import Image

    def png_chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    good = (faces_dir / "obama_small.jpg").read_bytes()
    buf = io.BytesIO()
    frames = [Image.new("RGB", (64, 64), (v, v, v)) for v in (0, 120, 240)]
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    gif = io.BytesIO()
    frames[0].save(gif, "GIF")
    bomb_header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    bad = {
        "empty.jpg": b"",
        "noise.jpg": np.random.default_rng(0).bytes(5000),
        "truncated.jpg": good[: len(good) // 2],
        "bomb.png": (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", bomb_header)
                     + png_chunk(b"IEND", b"")),
        "animated.png": buf.getvalue(),
        "image.gif": gif.getvalue(),
    }
    paths = []
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    proc = _matcher("embed", *paths, str(faces_dir / "obama_small.jpg"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in bad:
        assert name in proc.stderr, f"{name} not reported"
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert Path(record["file"]).name == "obama_small.jpg"


# Imported by a command only when it needs them; `matcher audit verify` and `matcher --help`
# need none of them.
HEAVY = ("numpy", "onnxruntime", "faiss", "grpc", "matcher.face", "matcher.gallery",
         "matcher.service.server")
_PROBE = """
import json, sys
from matcher.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
cli = [m for m in sys.modules if m.startswith("matcher.cli.")]
print(json.dumps({"rc": rc, "heavy": sorted(heavy), "cli": sorted(cli)}))
"""


def _probe(*args: str) -> tuple[str, dict]:
    """Run main(args) in a fresh interpreter: its output and what it imported."""
    code = f"HEAVY = {HEAVY!r}\n{_PROBE}"
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, _, last = proc.stdout.rstrip("\n").rpartition("\n")
    return out, json.loads(last)


def test_audit_verify_imports_only_its_own_module(tmp_path: Path) -> None:
    from matcher.service.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        for i in range(3):
            log.append("decision", lane_id="K-01", request_id=f"req-{i}", decision="MATCH",
                       traveller_id=f"T-{i}")
    out, seen = _probe("audit", "verify", str(path))
    assert seen["rc"] == 0 and out.startswith("ok: 3 records"), out
    assert seen["heavy"] == []
    assert seen["cli"] == ["matcher.cli.audit", "matcher.cli.commands", "matcher.cli.logs",
                           "matcher.cli.options"]


def test_help_lists_every_command_without_importing_any() -> None:
    out, seen = _probe("--help")
    assert seen["rc"] == 0
    for name, (_, text) in COMMANDS.items():
        assert name in out and text.split()[0] in out, name
    assert seen["heavy"] == [] and seen["cli"] == ["matcher.cli.commands"]  # the list alone


@pytest.mark.parametrize("argv, old", [
    (["serve"], None),
    (["demo"], None),
    (["reindex", "--manifest", "bookings.csv"], "--out"),
    (["gallery", "stats"], "--data-dir"),
    (["gallery", "export-snapshot"], "--data-dir"),
    (["gallery", "verify-snapshot", "SNAP"], "--data-dir"),
    (["gallery", "rewrap"], "--data-dir"),
])
def test_every_data_directory_is_data(argv: list[str], old: str | None, capsys) -> None:
    parser = build_parser(argv[0])
    assert parser.parse_args([*argv, "--data", "D"]).data == Path("D")
    if old:  # the earlier spelling still works, and is not advertised
        assert parser.parse_args([*argv, old, "D"]).data == Path("D")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    shown = capsys.readouterr().out
    assert "--data DIR" in shown and "--data-dir" not in shown
    if old == "--out":
        assert "--out" not in shown


def test_serve_takes_targets_not_thresholds() -> None:
    """--fmr, --fpir and --confidence-1ton become the server's DecisionPolicy; without them
    the policy's defaults (the cross-validated 1:N confidence) stand."""
    from matcher.cli.serve import _server_config
    from matcher.gallery.decision import DecisionPolicy

    parser = build_parser("serve")
    given = _server_config(parser.parse_args(
        ["serve", "--data", "D", "--fpir", "0.01", "--confidence-1ton", "0.9"]), demo=False)
    assert given.policy == DecisionPolicy(fpir_1toN=0.01, confidence_1toN=0.9)
    default = _server_config(parser.parse_args(["serve", "--data", "D"]), demo=False)
    assert default.policy == DecisionPolicy()
