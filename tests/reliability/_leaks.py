"""The forms a template or an image could take if it leaked into text, and a search for them.

A leak would rarely be the whole 2048-byte template verbatim: more likely a slice of the
raw bytes, its base64 or hex in a debug line, or the floats printed by numpy or repr().
Every form here is long enough (>= 24 raw bytes, >= 8 significant digits) that finding it
by chance in logs or metrics is negligible.
"""
from __future__ import annotations

import base64
import itertools
from collections.abc import Iterable

import numpy as np


def _windows(blob: bytes, size: int, count: int) -> list[bytes]:
    """``count`` slices of ``size`` bytes spread over ``blob``, aligned to 3 for base64."""
    if len(blob) <= size:
        return [blob]
    step = max(3, ((len(blob) - size) // max(1, count - 1)) // 3 * 3)
    return [blob[i:i + size] for i in range(0, len(blob) - size + 1, step)][:count]


def byte_forms(blob: bytes, label: str, count: int = 6) -> list[tuple[str, bytes]]:
    """Raw, base64 (standard and URL-safe), and hex (both cases) of slices of ``blob``."""
    forms: list[tuple[str, bytes]] = []
    for i, w in enumerate(_windows(blob, 48, count)):
        forms += [
            (f"{label} raw slice {i}", w[:24]),
            (f"{label} base64 slice {i}", base64.b64encode(w)),
            (f"{label} urlsafe-base64 slice {i}", base64.urlsafe_b64encode(w)),
            (f"{label} hex slice {i}", w[:24].hex().encode()),
            (f"{label} HEX slice {i}", w[:24].hex().upper().encode()),
        ]
    return forms


def template_forms(template: np.ndarray, label: str) -> list[tuple[str, bytes]]:
    """byte_forms of the float32 bytes (little and big endian) plus printed float values."""
    t = np.ascontiguousarray(template, dtype="<f4")
    forms = byte_forms(t.tobytes(), f"{label} f32le") + byte_forms(
        t.astype(">f4").tobytes(), f"{label} f32be", count=2)
    big = [float(v) for v in t if abs(v) >= 0.01][:6]
    for v in big:
        forms.append((f"{label} repr({v!r})", repr(v).encode()))           # 0.0123456789...
        forms.append((f"{label} float32 str", str(np.float32(v)).encode()))  # 0.01234568
    # Two neighbours as numpy or a JSON list would print them.
    pairs = [(float(a), float(b)) for a, b in itertools.pairwise(t) if abs(a) >= 0.01][:3]
    for a, b in pairs:
        forms.append((f"{label} json pair", f"{a}, {b}".encode()))
    return forms


def find_leaks(haystack: bytes, forms: Iterable[tuple[str, bytes]]) -> list[str]:
    """Names of the forms found in ``haystack`` (empty when nothing leaked)."""
    return [name for name, needle in forms if needle and needle in haystack]
