"""Re-encrypting stored templates: plain -> encrypted, key rotation, resume, the CLI."""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import MODEL, sha, templates

from matcher.errors import GalleryError
from matcher.gallery.codecs import (
    ENV_KEY,
    ENV_KEY_FILE,
    Keyring,
    PlainCodec,
    TemplateCipher,
    TemplateDecryptError,
)
from matcher.gallery.integrity import integrity_check
from matcher.gallery.primary import STORE_FILE, PrimaryGallery
from matcher.gallery.rewrap import rewrap_templates
from matcher.gallery.store import Enrolment, Store

REPO = Path(__file__).resolve().parents[1]


def fill(store: Store, x: np.ndarray, first: int = 0) -> None:
    """Travellers of 1 or 2 templates each, photo i -> row i of ``x``."""
    i = 0
    while i < len(x):
        k = 2 if (first + i) % 3 == 0 and i + 1 < len(x) else 1
        store.enroll(f"T-{first + i}", x[i:i + k], 0.0, 4e9,
                     [sha(first + j) for j in range(i, i + k)])
        i += k


def by_photo(store: Store) -> dict[str, np.ndarray]:
    """photo sha256 -> decoded template, for every stored row (through the store's codec)."""
    out = {}
    for t in store.list_travellers():
        trav = store.get(t.traveller_id)
        out.update(zip(trav.photo_sha256s, trav.templates, strict=True))
    return out


def raw_rows(db: Path) -> list[tuple[str, str, bytes]]:
    """(photo sha256, codec, blob) of every row, read around the store."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT photo_sha256, codec, template FROM templates "
                            "ORDER BY template_id").fetchall()


def disk_bytes(db: Path) -> bytes:
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def cipher(keys: dict[str, bytes], current: str) -> TemplateCipher:
    return TemplateCipher(Keyring(keys, current))


def test_plain_store_is_encrypted_in_place(tmp_path):
    db = tmp_path / STORE_FILE
    x = templates(11)
    # Kept open throughout, as a service would be: the plain pages then sit in the WAL,
    # which a checkpoint that does not reset it would leave on disk.
    writer = Store(db, MODEL)
    fill(writer, x)
    version, changes = writer.gallery_version, writer.changes_since(0)
    assert all(codec == "plain" for _, codec, _ in raw_rows(db))
    assert x[0].tobytes() in disk_bytes(db)  # the check below can see plain templates

    key = {"k1": os.urandom(32)}
    with writer, Store(db, MODEL, codec=cipher(key, "k1")) as store:
        with pytest.raises(GalleryError, match="stored with codec 'plain'"):
            store.read_all()  # what a server started with a key on a plain store hits
        assert rewrap_templates(store, PlainCodec(), batch=3) == 11
        # Checked while the store is open: the old plain pages must not linger in the WAL.
        on_disk = disk_bytes(db)
        assert store.gallery_version == version and store.changes_since(0) == changes
        assert rewrap_templates(store, PlainCodec(), batch=3) == 0
    for i in range(11):
        assert x[i].tobytes()[:64] not in on_disk and x[i].tobytes()[-64:] not in on_disk

    rows = raw_rows(db)
    assert len(rows) == 11 and all(codec == "aesgcm-v1" for _, codec, _ in rows)
    check = cipher(key, "k1")
    for _photo, _, blob in rows:
        assert check.key_id_of(blob) == "k1" and x[0].tobytes()[:64] not in blob
    with Store(db, MODEL, codec=cipher(key, "k1")) as store:
        decoded = by_photo(store)
        assert store.read_all().vectors.shape == (11, 512)
    assert len(decoded) == 11
    for i in range(11):
        assert decoded[sha(i)].dtype == np.float32
        np.testing.assert_array_equal(decoded[sha(i)], x[i])


def test_plain_rows_without_old_codec_are_refused_untouched(tmp_path):
    db = tmp_path / STORE_FILE
    with Store(db, MODEL) as store:
        fill(store, templates(4))
    before = raw_rows(db)
    with Store(db, MODEL, codec=cipher({"k1": os.urandom(32)}, "k1")) as store:
        with pytest.raises(GalleryError, match="4 with codec 'plain'.*--from-plain"):
            rewrap_templates(store)
        with pytest.raises(ValueError, match="batch"):
            rewrap_templates(store, PlainCodec(), batch=0)
    assert raw_rows(db) == before


def test_rotation_moves_every_row_to_the_new_key(tmp_path):
    db = tmp_path / STORE_FILE
    a, b = os.urandom(32), os.urandom(32)
    x = templates(9, seed=1)
    with Store(db, MODEL, codec=cipher({"A": a}, "A")) as store:
        fill(store, x[:7])
    with Store(db, MODEL, codec=cipher({"B": b, "A": a}, "B")) as store:
        fill(store, x[7:], first=7)  # written after the restart: already on B
        version = store.gallery_version
        assert rewrap_templates(store, batch=2) == 7
        assert store.gallery_version == version
        assert rewrap_templates(store, batch=2) == 0
    ring = cipher({"B": b}, "B")
    assert [ring.key_id_of(blob) for _, _, blob in raw_rows(db)] == ["B"] * 9

    with Store(db, MODEL, codec=ring) as store:  # the old key is retired
        decoded = by_photo(store)
        assert store.read_all().vectors.shape == (9, 512)
    for i in range(9):
        np.testing.assert_array_equal(decoded[sha(i)], x[i])
    with Store(db, MODEL, codec=cipher({"A": a}, "A")) as store:
        with pytest.raises(TemplateDecryptError, match="'B', which is not in the keyring"):
            store.read_all()


def test_a_failure_midway_leaves_rows_readable_and_a_rerun_finishes(tmp_path):
    db = tmp_path / STORE_FILE
    a, b = os.urandom(32), os.urandom(32)
    x = templates(8, seed=2)
    with Store(db, MODEL, codec=cipher({"A": a}, "A")) as store:
        fill(store, x)
    # Damage the 6th row (a bit of its ciphertext) so the rewrap stops in its third batch.
    with sqlite3.connect(db) as conn:
        tid, blob = conn.execute("SELECT template_id, template FROM templates "
                                 "ORDER BY template_id LIMIT 1 OFFSET 5").fetchone()
        conn.execute("UPDATE templates SET template=? WHERE template_id=?",
                     (blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], tid))

    ring = cipher({"B": b, "A": a}, "B")
    with Store(db, MODEL, codec=ring) as store:
        with pytest.raises(TemplateDecryptError, match=f"row {tid}: .*does not authenticate"):
            rewrap_templates(store, batch=2)
    keys = [ring.key_id_of(row[2]) for row in raw_rows(db)]
    assert keys == ["B"] * 4 + ["A"] * 4  # two batches committed, the third rolled back

    with sqlite3.connect(db) as conn:  # the operator restores the row from a backup
        conn.execute("UPDATE templates SET template=? WHERE template_id=?", (blob, tid))
    with Store(db, MODEL, codec=ring) as store:
        assert rewrap_templates(store, batch=2) == 4
        assert rewrap_templates(store, batch=2) == 0
    with Store(db, MODEL, codec=cipher({"B": b}, "B")) as store:
        decoded = by_photo(store)
    for i in range(8):
        np.testing.assert_array_equal(decoded[sha(i)], x[i])


def _matcher(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matcher.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_rewrap_from_plain_then_the_gallery_loads_with_the_key(tmp_path):
    data = tmp_path / "g"
    x = templates(6, seed=3)
    with PrimaryGallery.open(data, MODEL) as gallery:
        for i in range(6):
            gallery.enroll(f"T-{i}", x[i], 0.0, 4e9, [sha(i)])
    env = {k: v for k, v in os.environ.items() if k not in (ENV_KEY, ENV_KEY_FILE)}

    done = _matcher(["gallery", "rewrap", "--data", str(data), "--from-plain"], env)
    assert done.returncode == 2 and "no template key" in done.stderr

    key = os.urandom(32)
    env[ENV_KEY] = f"2026-11b:{key.hex()}"
    done = _matcher(["gallery", "rewrap", "--data", str(data)], env)
    assert done.returncode == 2 and "--from-plain" in done.stderr
    assert key.hex() not in done.stderr + done.stdout

    done = _matcher(["gallery", "rewrap", "--data", str(data), "--from-plain"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"rewrapped": 6, "templates": 6, "key_id": "2026-11b"}
    done = _matcher(["gallery", "rewrap", "--data-dir", str(data)], env)
    assert done.returncode == 0 and json.loads(done.stdout)["rewrapped"] == 0

    with PrimaryGallery.open(data, MODEL, codec=TemplateCipher.from_env({ENV_KEY: env[ENV_KEY]})
                      ) as gallery:
        rows = gallery.store.read_all()
    assert len(rows.vectors) == 6
    for vector, owner in zip(rows.vectors, rows.owner, strict=True):
        i = int(rows.traveller_ids[owner].split("-")[1])
        np.testing.assert_array_equal(vector, x[i])


def test_cli_killed_midway_leaves_every_row_readable_and_a_rerun_finishes(tmp_path):
    data = tmp_path / "g"
    data.mkdir()
    a, b = os.urandom(32), os.urandom(32)
    x = templates(600, seed=4)
    with Store(data / STORE_FILE, MODEL, codec=cipher({"A": a}, "A")) as store:
        store.enroll_many([Enrolment(f"T-{i}", x[i], 0.0, 4e9, [sha(i)]) for i in range(600)])
    keys = tmp_path / "keys"
    keys.write_text(f"B:{b.hex()}\nA:{a.hex()}\n")
    keys.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY}
    env[ENV_KEY_FILE] = str(keys)

    # One row per transaction so the kill lands between commits, after >= 100 of them.
    proc = subprocess.Popen([sys.executable, "-m", "matcher.cli", "gallery", "rewrap",
                             "--data", str(data), "--batch", "1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A one-page pipe: the child blocks on its progress lines instead of racing to the end
    # while this process, on a busy machine, is still reading line 100.
    fcntl.fcntl(proc.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    try:
        for line in proc.stderr:
            if "re-encoded 100 of 600" in line:
                proc.kill()
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    ring = cipher({"B": b, "A": a}, "B")
    on_b = sum(ring.key_id_of(blob) == "B" for _, _, blob in raw_rows(data / STORE_FILE))
    assert 100 <= on_b < 600, "the kill did not land mid-way"

    with Store(data / STORE_FILE, MODEL, codec=ring) as store:
        assert integrity_check(store) == "ok"
        np.testing.assert_array_equal(store.read_all().vectors, x)  # every row readable
    done = _matcher(["gallery", "rewrap", "--data", str(data)], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rewrapped"] == 600 - on_b
    with Store(data / STORE_FILE, MODEL, codec=cipher({"B": b}, "B")) as store:
        np.testing.assert_array_equal(store.read_all().vectors, x)
