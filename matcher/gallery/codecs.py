"""How a template is stored: a ``TemplateCodec`` turns it into the bytes of one store row.

``PlainCodec`` writes float32 bytes; ``TemplateCipher`` seals them with AES-256-GCM and a
keyring (``codec_from_env`` picks it when a key is configured).

Blob layout (one per template row)::

    b"\\x01" | len(key_id) (1 byte) | key_id (ASCII) | nonce (12 random bytes) | ciphertext+tag

The associated data is a fixed label, the blob header (version and key id) and the row
context the store passes (traveller id and photo sha256), so a blob copied onto another
traveller's row, or relabelled with another key id, fails authentication instead of
decoding to someone else's template.

Keys come from ``MATCHER_TEMPLATE_KEY`` (one key) or ``MATCHER_TEMPLATE_KEY_FILE`` (a
keyring, one key per line, the first one current), as 32 bytes in hex or base64, each
optionally prefixed ``key_id:``. Rotation steps are in docs/security.md.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import GalleryError, MatcherError
from ..templates import EMBEDDING_DIM


class TemplateCodec(Protocol):
    """Turns a template into the bytes stored in SQLite and back.

    ``context`` identifies the row (traveller id and photo sha256); an encrypting codec
    binds it as associated data so a blob moved to another row fails to decode.
    """

    name: str

    def encode(self, template: np.ndarray, context: bytes) -> bytes: ...

    def decode(self, blob: bytes, context: bytes) -> np.ndarray: ...


class PlainCodec:
    """Little-endian float32 bytes, unencrypted (the default)."""

    name = "plain"

    def encode(self, template: np.ndarray, context: bytes) -> bytes:
        return np.ascontiguousarray(template, dtype="<f4").tobytes()

    def decode(self, blob: bytes, context: bytes) -> np.ndarray:
        if len(blob) != EMBEDDING_DIM * 4:
            raise GalleryError(f"stored template has {len(blob)} bytes, expected "
                               f"{EMBEDDING_DIM * 4}; the store is damaged")
        return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def row_context(traveller_id: str, photo_sha256: str) -> bytes:
    return f"{traveller_id}\x00{photo_sha256}".encode()



ENV_KEY = "MATCHER_TEMPLATE_KEY"
ENV_KEY_FILE = "MATCHER_TEMPLATE_KEY_FILE"
BLOB_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_AAD_LABEL = b"matcher/template/v1\x00"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
TEMPLATE_BYTES = EMBEDDING_DIM * 4


class KeyConfigError(MatcherError):
    """The template key or keyring is missing or malformed (never says what the key is)."""


class TemplateDecryptError(GalleryError):
    """A stored template does not authenticate: wrong key, moved row, or damaged bytes."""


def parse_key(material: str) -> bytes:
    """32 key bytes from 64 hex characters or standard base64; KeyConfigError otherwise."""
    text = material.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError("a template key must be 32 bytes written as 64 hex characters "
                             "or base64") from None
    if len(key) != KEY_BYTES:
        raise KeyConfigError(f"a template key must be {KEY_BYTES} bytes; the base64 value "
                             f"decodes to {len(key)}")
    return key


def key_fingerprint(key: bytes) -> str:
    """A short public name for a key (first 8 hex digits of sha256 over a label + key)."""
    return hashlib.sha256(b"matcher key id\x00" + key).hexdigest()[:8]


def generate_key() -> str:
    """A fresh random key in hex, ready for a key file line."""
    return os.urandom(KEY_BYTES).hex()


@dataclass(frozen=True)
class Keyring:
    """Known keys by id; ``current`` encrypts, every key decrypts."""

    keys: Mapping[str, bytes]
    current: str

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise KeyConfigError(f"the current key id {self.current!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if not _KEY_ID.match(key_id):
                raise KeyConfigError(f"key id {key_id!r} must be 1-32 of [A-Za-z0-9._-]")
            if len(key) != KEY_BYTES:
                raise KeyConfigError(f"key {key_id!r} is {len(key)} bytes, not {KEY_BYTES}")

    @classmethod
    def single(cls, key: bytes, key_id: str | None = None) -> Keyring:
        key_id = key_id or key_fingerprint(key)
        return cls({key_id: key}, key_id)

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """One key per line, ``[key_id:]material``; ``#`` comments; the first is current."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key_id, sep, material = line.partition(":")
            if not sep:
                material, key_id = key_id, ""
            try:
                key = parse_key(material)
            except KeyConfigError as exc:
                raise KeyConfigError(f"keyring line {n}: {exc}") from None
            key_id = key_id.strip() or key_fingerprint(key)
            if key_id in keys:
                raise KeyConfigError(f"keyring line {n}: key id {key_id!r} appears twice")
            keys[key_id] = key
            order.append(key_id)
        if not order:
            raise KeyConfigError("the keyring holds no key")
        return cls(keys, order[0])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        path = Path(path)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyConfigError(f"key file {path} is readable by group or others; "
                                     f"chmod 600 it")
            return cls.parse(path.read_text(encoding="ascii"))
        except OSError as exc:
            raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyConfigError(f"key file {path} is not ASCII text") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring configured in the environment, or None when neither variable is set."""
        env = os.environ if environ is None else environ
        key, key_file = env.get(ENV_KEY), env.get(ENV_KEY_FILE)
        if key and key_file:
            raise KeyConfigError(f"set either {ENV_KEY} or {ENV_KEY_FILE}, not both")
        if key_file:
            return cls.from_file(key_file)
        if key:
            return cls.parse(key)
        return None


class TemplateCipher:
    """AES-256-GCM ``TemplateCodec`` for matcher.gallery.store: encrypt with the current key,
    decrypt with whichever key id the blob names.

    ``encode``: (512,) float32 template + row context -> blob.
    ``decode``: blob + row context -> (512,) float32; TemplateDecryptError if it does
    not authenticate.
    """

    # The store records this per row and refuses a mismatch; it names the blob format,
    # not the key, so rotating keys does not change it.
    name = "aesgcm-v1"

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aead = {key_id: AESGCM(key) for key_id, key in keyring.keys.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TemplateCipher:
        keyring = Keyring.from_env(environ)
        if keyring is None:
            raise KeyConfigError(f"template encryption needs {ENV_KEY} or {ENV_KEY_FILE}")
        return cls(keyring)

    @property
    def key_id(self) -> str:
        return self.keyring.current

    def encode(self, template: np.ndarray, context: bytes) -> bytes:
        plain = np.ascontiguousarray(template, dtype="<f4")
        if plain.shape != (EMBEDDING_DIM,):
            raise ValueError(f"a template is ({EMBEDDING_DIM},) float32, got: "
                             f"shape={plain.shape}")
        header = _header(self.key_id)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self.key_id].encrypt(nonce, plain.tobytes(), _aad(header, context))
        return header + nonce + sealed

    def decode(self, blob: bytes, context: bytes) -> np.ndarray:
        key_id, header_len = _read_header(blob)
        aead = self._aead.get(key_id)
        if aead is None:
            raise TemplateDecryptError(
                f"a template is encrypted with key {key_id!r}, which is not in the keyring")
        header = blob[:header_len]
        nonce = blob[header_len:header_len + NONCE_BYTES]
        try:
            plain = aead.decrypt(nonce, blob[header_len + NONCE_BYTES:], _aad(header, context))
        except InvalidTag:
            raise TemplateDecryptError(
                f"a template encrypted with key {key_id!r} does not authenticate: wrong key, "
                "a row moved to another traveller, or damaged bytes") from None
        if len(plain) != TEMPLATE_BYTES:
            raise TemplateDecryptError(f"a decrypted template has {len(plain)} bytes, "
                                       f"expected {TEMPLATE_BYTES}")
        return np.frombuffer(plain, dtype="<f4").astype(np.float32)

    def key_id_of(self, blob: bytes) -> str:
        """The key id a blob was encrypted with (to find rows still on an old key)."""
        return _read_header(blob)[0]


def codec_from_env(environ: Mapping[str, str] | None = None) -> TemplateCipher | None:
    """The store codec the environment asks for: a TemplateCipher when
    MATCHER_TEMPLATE_KEY or MATCHER_TEMPLATE_KEY_FILE is set, else None (plain).

    Every process that opens the store (server, overnight job, gallery CLI) should call
    this, so they all read and write the same codec.
    """
    keyring = Keyring.from_env(environ)
    return TemplateCipher(keyring) if keyring is not None else None


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return bytes((BLOB_VERSION, len(raw))) + raw


def _read_header(blob: bytes) -> tuple[str, int]:
    """(key_id, header length) of a blob; TemplateDecryptError if it is not one of ours."""
    if len(blob) < 2 or blob[0] != BLOB_VERSION:
        raise TemplateDecryptError("a stored template is not an encrypted template blob "
                                   "(unknown format version)")
    n = blob[1]
    header_len = 2 + n
    if n == 0 or len(blob) < header_len + NONCE_BYTES + 16:
        raise TemplateDecryptError("a stored encrypted template is truncated")
    try:
        key_id = blob[2:header_len].decode("ascii")
    except UnicodeDecodeError:
        raise TemplateDecryptError("a stored encrypted template has a damaged header") from None
    return key_id, header_len


def _aad(header: bytes, context: bytes) -> bytes:
    # Length-prefix the context so (header, context) pairs cannot collide by shifting bytes.
    return _AAD_LABEL + header + len(context).to_bytes(4, "big") + context
