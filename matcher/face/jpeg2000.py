"""JPEG 2000 headers read before OpenJPEG sees a byte: size, components, tiles, levels.

Both forms a photo comes in: the JP2 file (ISO/IEC 15444-1 annex I: boxes, the image
header box ``ihdr`` inside ``jp2h``, the codestream in ``jp2c``) and the raw J2K
codestream a passport chip often holds (annex A: SOC, then SIZ, then the main header's
marker segments up to the first SOT). OpenJPEG sizes its structures from these fields
when it opens a file: one tile-coding record per tile (a 1 x 1 tile grid over a large
canvas is millions of them), its buffers from the canvas and component count, so every
field that scales memory is checked here against ``Jpeg2000Limits`` first.

Only the fields this needs are read; everything else is left to the decoder.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CorruptImage, ImageTooLarge, UnsupportedImage

JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
J2K_SIGNATURE = b"\xff\x4f\xff\x51"   # SOC, then SIZ: the first two markers of every codestream

_SIZ, _COD, _COC, _SOT = 0xFF51, 0xFF52, 0xFF53, 0xFF90
# Markers without a length field (annex A.1.1: 0xFF30-0xFF3F, SOC, SOD, EOC).
_NO_LENGTH = {0xFF4F, 0xFF93, 0xFFD9} | set(range(0xFF30, 0xFF40))


@dataclass(frozen=True)
class Jpeg2000Limits:
    """What a photo's JPEG 2000 header may declare beyond the pixel limits all formats share.

    Real encoders write one tile or a few hundred (cameras and scanners tile large images
    at 256-1024 px), 1-4 components, 5 or 6 decomposition levels and 1-20 quality layers.
    """

    max_tiles: int = 4096
    max_components: int = 4        # Pillow decodes at most 4 (L, LA, RGB, RGBA / CMYK)
    max_bit_depth: int = 16
    max_decomposition_levels: int = 12   # a 12,000 px side at 2**-12 is 3 px: none need more
    max_layers: int = 64


DEFAULT_JPEG2000_LIMITS = Jpeg2000Limits()


@dataclass(frozen=True)
class Jpeg2000Header:
    """What the codestream's main header declares.

    size: (width, height) of the image area; origin: its (x, y) on the reference grid;
    tiles: tile count; levels: the fewest decomposition levels any component has (COD, or
    a COC that lowers it), so 2**levels is the largest reduction every component allows.
    """

    size: tuple[int, int]
    origin: tuple[int, int]
    components: int
    bit_depth: int
    tiles: int
    levels: int
    layers: int


def is_jpeg2000(data: bytes) -> bool:
    return data.startswith((JP2_SIGNATURE, J2K_SIGNATURE))


def read_header(data: bytes, limits: Jpeg2000Limits = DEFAULT_JPEG2000_LIMITS
                ) -> Jpeg2000Header:
    """The header of a JP2 file or J2K codestream, checked against ``limits``.

    Raises CorruptImage (damaged or inconsistent header), UnsupportedImage (a form the
    decoder does not handle) or ImageTooLarge (tiles, levels, layers over the limits). The
    pixel limits (DecodeLimits) are the caller's to check on ``size``.
    """
    if data.startswith(J2K_SIGNATURE):
        return _codestream(data, 0, len(data), limits)
    if not data.startswith(JP2_SIGNATURE):
        raise UnsupportedImage("the bytes are not a JPEG 2000 file or codestream")
    ihdr, start, end = _jp2_boxes(data)
    header = _codestream(data, start, end, limits)
    if ihdr != header.size:
        # Pillow sizes its image from ihdr, OpenJPEG decodes the codestream: they must agree
        raise CorruptImage(f"the JPEG 2000 file's header says {ihdr[0]}x{ihdr[1]} pixels but "
                           f"its codestream {header.size[0]}x{header.size[1]}; it is damaged")
    return header


def _jp2_boxes(data: bytes) -> tuple[tuple[int, int], int, int]:
    """(ihdr's (width, height), start, end of the first jp2c box's codestream)."""
    ihdr: tuple[int, int] | None = None
    for kind, start, end in _boxes(data, len(JP2_SIGNATURE), len(data)):
        if kind == b"jp2h" and ihdr is None:
            for sub, s, e in _boxes(data, start, end):
                if sub == b"ihdr":
                    if e - s < 14:
                        raise CorruptImage("the JPEG 2000 image header box is too short")
                    height, width = struct.unpack_from(">II", data, s)
                    ihdr = (width, height)
                    break
        elif kind == b"jp2c":
            if ihdr is None:  # the standard puts jp2h first; Pillow reads it from there
                raise CorruptImage("the JPEG 2000 file has no image header before its "
                                   "codestream")
            return ihdr, start, end
    raise CorruptImage("the JPEG 2000 file holds no image header or no codestream; "
                       "it is truncated or damaged")


def _boxes(data: bytes, start: int, end: int):
    """(type, content start, content end) of each box in data[start:end], one level."""
    pos = start
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > end:
                raise CorruptImage("a JPEG 2000 box header is cut short")
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:  # the last box: to the end of the file
            length = end - pos
        if length < header or pos + length > end:
            raise CorruptImage("a JPEG 2000 box is longer than the file; it is truncated or "
                               "damaged")
        yield kind, pos + header, pos + length
        pos += length


def _codestream(data: bytes, start: int, end: int, limits: Jpeg2000Limits) -> Jpeg2000Header:
    if data[start:start + 4] != J2K_SIGNATURE:
        raise CorruptImage("the JPEG 2000 codestream does not start with SOC and SIZ")
    pos = start + 4
    if pos + 2 > end:
        raise CorruptImage("the JPEG 2000 codestream is cut short in its SIZ marker")
    (lsiz,) = struct.unpack_from(">H", data, pos)
    if lsiz < 41 or pos + lsiz > end:
        raise CorruptImage("the JPEG 2000 SIZ marker is damaged or cut short")
    (_, x1, y1, x0, y0, xt, yt, xt0, yt0, components) = struct.unpack_from(
        ">HIIIIIIIIH", data, pos + 2)
    if components < 1 or lsiz != 38 + 3 * components:
        raise CorruptImage("the JPEG 2000 SIZ marker's component count does not match its "
                           "length; it is damaged")
    if components > limits.max_components:
        raise UnsupportedImage(f"the JPEG 2000 image has {components} components; a photo "
                               f"has at most {limits.max_components}")
    depth = 0
    for c in range(components):
        ssiz, dx, dy = data[pos + 38 + 3 * c:pos + 41 + 3 * c]
        depth = max(depth, (ssiz & 0x7F) + 1)
        if dx == 0 or dy == 0:
            raise CorruptImage("the JPEG 2000 SIZ marker has a zero subsampling factor")
    if depth > limits.max_bit_depth:
        raise UnsupportedImage(f"the JPEG 2000 image has {depth}-bit samples; at most "
                               f"{limits.max_bit_depth} are supported")
    if not (x0 < x1 and y0 < y1 and xt > 0 and yt > 0 and xt0 <= x0 and yt0 <= y0
            and xt0 + xt > x0 and yt0 + yt > y0):
        raise CorruptImage("the JPEG 2000 image or tile grid in SIZ is inconsistent; "
                           "the file is damaged")
    tiles = -(-(x1 - xt0) // xt) * -(-(y1 - yt0) // yt)
    if tiles > limits.max_tiles:
        raise ImageTooLarge(f"the JPEG 2000 image is cut into {tiles} tiles; at most "
                            f"{limits.max_tiles} are accepted")
    levels, most_levels, layers = _coding_style(data, pos + lsiz, end, components)
    if most_levels > limits.max_decomposition_levels:
        raise ImageTooLarge(f"the JPEG 2000 image declares {most_levels} decomposition levels; "
                            f"at most {limits.max_decomposition_levels} are accepted")
    if layers > limits.max_layers:
        raise ImageTooLarge(f"the JPEG 2000 image declares {layers} quality layers; at most "
                            f"{limits.max_layers} are accepted")
    return Jpeg2000Header((x1 - x0, y1 - y0), (x0, y0), components, depth, tiles, levels,
                          layers)


def _coding_style(data: bytes, pos: int, end: int, components: int
                  ) -> tuple[int, int, int]:
    """(fewest, most decomposition levels over components, quality layers) from the main
    header's COD marker and any COC markers (which set one component's levels)."""
    cod: tuple[int, int] | None = None
    coc_levels: list[int] = []
    while pos + 4 <= end:
        (marker,) = struct.unpack_from(">H", data, pos)
        if marker >> 8 != 0xFF:
            raise CorruptImage("the JPEG 2000 main header is damaged (no marker where one "
                               "must be)")
        if marker == _SOT:
            break
        if marker in _NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            raise CorruptImage("a JPEG 2000 marker segment is longer than the file; it is "
                               "truncated or damaged")
        body = pos + 4
        if marker == _COD:
            if length < 12:
                raise CorruptImage("the JPEG 2000 COD marker is too short")
            (layers,) = struct.unpack_from(">H", data, body + 2)
            cod = (data[body + 5], layers)
        elif marker == _COC:
            index_bytes = 2 if components >= 257 else 1
            if length < 2 + index_bytes + 1 + 5:
                raise CorruptImage("the JPEG 2000 COC marker is too short")
            coc_levels.append(data[body + index_bytes + 1])
        pos += 2 + length
    if cod is None:
        raise CorruptImage("the JPEG 2000 codestream has no COD marker in its main header; "
                           "it is truncated or damaged")
    levels, layers = cod
    every = [levels, *coc_levels]
    return min(every), max(every), layers
