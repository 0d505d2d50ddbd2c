"""Template encryption: round trip, wrong key and moved rows fail, key rotation works."""
from __future__ import annotations

import base64
import hashlib
import os
import sqlite3

import numpy as np
import pytest

from matcher.gallery.codecs import (
    ENV_KEY,
    ENV_KEY_FILE,
    KeyConfigError,
    Keyring,
    TemplateCipher,
    TemplateDecryptError,
    codec_from_env,
    generate_key,
    parse_key,
)

CTX_A = b"T-0001\x00" + b"a" * 64
CTX_B = b"T-0002\x00" + b"b" * 64


def _template(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return x / np.linalg.norm(x)


def _cipher(*key_ids: str) -> tuple[TemplateCipher, dict[str, bytes]]:
    keys = {k: os.urandom(32) for k in key_ids}
    return TemplateCipher(Keyring(keys, key_ids[0])), keys


def test_round_trip_is_exact_and_hides_the_template():
    cipher, _ = _cipher("k1")
    t = _template(1)
    blob = cipher.encode(t, CTX_A)
    out = cipher.decode(blob, CTX_A)
    assert out.dtype == np.float32 and out.shape == (512,)
    np.testing.assert_array_equal(out, t)
    assert t.tobytes() not in blob and t.tobytes()[:64] not in blob
    assert cipher.encode(t, CTX_A) != blob  # a fresh nonce every time
    assert cipher.key_id_of(blob) == "k1"


def test_wrong_key_fails():
    ours, _ = _cipher("k1")
    theirs, _ = _cipher("k1")  # same id, different key material
    blob = ours.encode(_template(2), CTX_A)
    with pytest.raises(TemplateDecryptError, match="does not authenticate"):
        theirs.decode(blob, CTX_A)


def test_unknown_key_id_fails():
    ours, _ = _cipher("k1")
    other, _ = _cipher("k2")
    with pytest.raises(TemplateDecryptError, match="not in the keyring"):
        other.decode(ours.encode(_template(3), CTX_A), CTX_A)


def test_blob_moved_to_another_row_fails():
    cipher, _ = _cipher("k1")
    blob = cipher.encode(_template(4), CTX_A)
    with pytest.raises(TemplateDecryptError):
        cipher.decode(blob, CTX_B)
    with pytest.raises(TemplateDecryptError):
        cipher.decode(blob, CTX_A[:-1] + b"b")  # same traveller, another photo


def test_relabelled_key_id_fails():
    cipher, _ = _cipher("k1", "k2")  # both keys known: only the AAD can catch this
    blob = bytearray(cipher.encode(_template(5), CTX_A))
    blob[2:4] = b"k2"
    with pytest.raises(TemplateDecryptError):
        cipher.decode(bytes(blob), CTX_A)


@pytest.mark.parametrize("damage", [
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),    # tag
    lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],  # nonce / ciphertext
    lambda b: b[:10],                          # truncated
    lambda b: b"\x07" + b[1:],                 # unknown format version
    lambda b: b"",
])
def test_damaged_blob_fails(damage):
    cipher, _ = _cipher("k1")
    blob = cipher.encode(_template(6), CTX_A)
    with pytest.raises(TemplateDecryptError):
        cipher.decode(damage(blob), CTX_A)


def test_rotation_decrypts_old_encrypts_new_and_rewraps():
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = TemplateCipher(Keyring({"2026a": old_key}, "2026a"))
    old_blob = before.encode(_template(7), CTX_A)

    during = TemplateCipher(Keyring({"2026b": new_key, "2026a": old_key}, "2026b"))
    np.testing.assert_array_equal(during.decode(old_blob, CTX_A), _template(7))
    assert during.key_id_of(during.encode(_template(8), CTX_B)) == "2026b"
    new_blob = during.encode(during.decode(old_blob, CTX_A), CTX_A)  # what a rewrap does
    assert during.key_id_of(new_blob) == "2026b"

    after = TemplateCipher(Keyring({"2026b": new_key}, "2026b"))
    np.testing.assert_array_equal(after.decode(new_blob, CTX_A), _template(7))
    with pytest.raises(TemplateDecryptError):
        after.decode(old_blob, CTX_A)  # a row that missed the rewrap is caught, not garbled


def test_key_formats_and_refusals_never_echo_the_key():
    key = os.urandom(32)
    assert parse_key(key.hex()) == key
    assert parse_key(key.hex().upper()) == key
    assert parse_key(base64.b64encode(key).decode()) == key
    assert len(bytes.fromhex(generate_key())) == 32
    for bad in (key.hex()[:-2], base64.b64encode(key[:16]).decode(), "not a key!",
                key.hex() + "00"):
        with pytest.raises(KeyConfigError) as info:
            parse_key(bad)
        assert bad not in str(info.value)


def test_keyring_file_first_line_is_current(tmp_path):
    k1, k2 = os.urandom(32), os.urandom(32)
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11-25\nnew:{k2.hex()}\nold:{base64.b64encode(k1).decode()}\n")
    path.chmod(0o600)
    ring = Keyring.from_env({ENV_KEY_FILE: str(path)})
    assert ring.current == "new" and ring.keys == {"new": k2, "old": k1}


def test_keyring_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text(generate_key() + "\n")
    path.chmod(0o644)
    with pytest.raises(KeyConfigError, match="chmod 600"):
        Keyring.from_file(path)


def test_env_single_key_and_ambiguous_config(tmp_path):
    key = os.urandom(32)
    cipher = TemplateCipher.from_env({ENV_KEY: key.hex()})
    assert cipher.keyring.keys == {cipher.key_id: key}
    with pytest.raises(KeyConfigError, match="not both"):
        Keyring.from_env({ENV_KEY: key.hex(), ENV_KEY_FILE: str(tmp_path / "k")})
    with pytest.raises(KeyConfigError):
        TemplateCipher.from_env({})
    assert codec_from_env({}) is None
    assert codec_from_env({ENV_KEY: key.hex()}).keyring.keys == {cipher.key_id: key}
    with pytest.raises(KeyConfigError, match="twice"):
        Keyring.parse(f"a:{key.hex()}\na:{key.hex()}")


def test_store_with_cipher_keeps_templates_encrypted_and_bound_to_their_row(tmp_path):
    from matcher.gallery.integrity import quarantined
    from matcher.gallery.store import Store

    cipher, _ = _cipher("k1")
    db = tmp_path / "gallery.sqlite"
    ta, tb = _template(10), _template(11)
    sha_a, sha_b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    with Store(db, "buffalo_l", codec=cipher) as store:
        store.enroll("T-A", ta[None], 0.0, 4e9, [sha_a])
        store.enroll("T-B", tb[None], 0.0, 4e9, [sha_b])
        np.testing.assert_array_equal(store.get("T-A").templates[0], ta)
        rows = store.read_all()
        assert rows.vectors.shape == (2, 512)

    raw = db.read_bytes() + (db.with_name(db.name + "-wal").read_bytes()
                             if db.with_name(db.name + "-wal").exists() else b"")
    assert ta.tobytes() not in raw and tb.tobytes() not in raw

    # An attacker with write access swaps the two template blobs between travellers.
    with sqlite3.connect(db) as conn:
        (ba,), (bb,) = conn.execute("SELECT template FROM templates ORDER BY traveller_id")
        conn.execute("UPDATE templates SET template=? WHERE traveller_id='T-A'", (bb,))
        conn.execute("UPDATE templates SET template=? WHERE traveller_id='T-B'", (ba,))
    with Store(db, "buffalo_l", codec=cipher) as store:
        # The row checksum catches it first: quarantined, never decoded nor searched.
        assert len(store.get("T-A").templates) == 0
        assert [d.traveller_id for d in quarantined(store)] == ["T-A"]
    # And the cipher alone refuses the blob on the wrong row.
    with pytest.raises(TemplateDecryptError):
        cipher.decode(bb, f"T-A\x00{sha_a}".encode())
