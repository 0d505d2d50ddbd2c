"""Decompression-bomb headers around real small WebP, HEIC and AVIF files.

Shared by tests/test_decode.py and tests/reliability/test_fuzz_decode.py: each builder
takes a file written by the real encoder and makes its header declare another size, so
what a decoder sees is a valid file up to the dimensions.
"""
from __future__ import annotations

import struct


def webp_bomb(frame: bytes, width: int, height: int) -> bytes:
    """An extended WebP (VP8X) declaring a ``width`` x ``height`` canvas (1 to 2**24 each)
    around ``frame``, a real simple WebP: how a 30,000 x 30,000 WebP header looks (the
    simple form stops at 16,383)."""
    vp8x = (b"VP8X" + struct.pack("<I", 10) + bytes(4)
            + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))
    body = b"WEBP" + vp8x + frame[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def ispe_bomb(data: bytes, width: int, height: int) -> bytes:
    """A real HEIC/AVIF file whose every image spatial extents property ('ispe') declares
    ``width`` x ``height``."""
    raw = bytearray(data)
    pos = raw.find(b"ispe")
    assert pos > 0, "the encoder wrote no ispe property"
    while pos > 0:
        raw[pos + 8:pos + 16] = struct.pack(">II", width, height)
        pos = raw.find(b"ispe", pos + 4)
    return bytes(raw)


def j2k_bomb(data: bytes, width: int, height: int, tile: tuple[int, int] | None = None
             ) -> bytes:
    """A real JPEG 2000 file (JP2 or raw J2K codestream) whose SIZ marker (and JP2 image
    header box) declare ``width`` x ``height``; its tile grid one tile of that size unless
    ``tile`` (width, height) is given (a fine grid is a bomb of its own: one record per
    tile)."""
    raw = bytearray(data)
    siz = raw.find(b"\xff\x4f\xff\x51") + 4   # SOC, SIZ: then Lsiz, Rsiz, Xsiz, Ysiz, ...
    assert siz >= 4, "no codestream in the file"
    tw, th = tile or (width, height)
    raw[siz + 4:siz + 36] = struct.pack(">IIIIIIII", width, height, 0, 0, tw, th, 0, 0)
    ihdr = raw.find(b"ihdr")
    if ihdr > 0 and ihdr < siz:
        raw[ihdr + 4:ihdr + 12] = struct.pack(">II", height, width)
    return bytes(raw)
