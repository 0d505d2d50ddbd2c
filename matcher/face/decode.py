"""Image bytes -> (H, W, 3) uint8 RGB, refusing anything unsafe before it is decoded.

Accepted: JPEG, PNG, WebP, HEIC/HEIF, AVIF and JPEG 2000 (JP2 files and raw J2K
codestreams), told apart by their first bytes (a WebP named ``.jpg`` is a WebP); and a
passport chip's DG2 (or a bare ISO/IEC 19794-5 facial record), whose portrait is unwrapped
(matcher.face.document) and decoded as the image it is. The header is read first: byte
and pixel limits are checked there, so a 30,000 x 30,000 "decompression bomb" costs a few
hundred bytes of parsing and no allocation (for JPEG 2000 also its tiles, components and
levels: matcher.face.jpeg2000). EXIF orientation (and HEIF/AVIF irot/imir) is applied, so
a phone photo stored sideways is matched upright.

``decode_reduced`` decodes a large JPEG at 1/2, 1/4 or 1/8 of its size instead (libjpeg's
DCT scaling: the reduction is done inside the IDCT, so the full-size pixels are never
made), and a JPEG 2000 at a lower resolution level of its wavelet pyramid (the finer
levels are never decoded), and says how its pixels map back to the full-size image's.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, Jpeg2KImagePlugin, UnidentifiedImageError
from pillow_heif import register_heif_opener

from ..errors import (
    CorruptImage,
    DocumentUnreadable,
    EmptyImage,
    ImageTooLarge,
    InvalidInput,
    UnsupportedImage,
)
from . import jpeg2000
from .document import is_document, read_portrait

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "JPEG2000")
ACCEPTED_NAMES = "JPEG, PNG, WebP, HEIC/HEIF, AVIF or JPEG 2000"

# Thumbnails, depth maps and auxiliary images are never looked at: do not list them.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# ISO-BMFF brands (the ftyp box) of a HEIF still image or collection, and of AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm",
                          b"hevs", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Formats we recognise only to name them in the refusal.
_OTHER_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                (b"%PDF", "PDF"))

# What decoders raise on damaged data. pillow-heif reports libheif errors as RuntimeError.
# Pillow's JPEG 2000 header parser asserts on some damage (and -O would strip the assert).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                  RuntimeError, struct.error, AssertionError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds on what a probe or booking photo may be."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 12 MP phone photo fits three times over
    max_side: int = 12_000
    min_side: int = 32


DEFAULT_LIMITS = DecodeLimits()

# Our own limits are stricter and checked first; Pillow's bomb guard stays as a backstop.
Image.MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_pixels


# JPEG DCT scaling factors libjpeg offers (and Pillow's ``draft`` picks from), largest first;
# JPEG 2000 offers the same powers of two as resolution levels (2**levels at most).
JPEG_REDUCTIONS = (8, 4, 2)

# Output axes that EXIF orientation reverses relative to the stored pixels (x, y); values
# 2-8 are the tag's, transposed as ImageOps.exif_transpose does.
_REVERSED_AXES = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True),
                  5: (False, False), 6: (True, False), 7: (True, True), 8: (False, True)}


@dataclass(frozen=True)
class ReducedImage:
    """A photo decoded at 1/``reduction`` of its size per side.

    pixels:    (h, w, 3) uint8 RGB, C-contiguous, orientation applied.
    reduction: 1 (every format but JPEG and JPEG 2000, or one too small to reduce), 2, 4
               or 8.
    full_size: (width, height) the full-size decode has, orientation applied.
    offset:    (x, y) in full-size pixels: pixel centre ``p`` of ``pixels`` is the full-size
               point ``reduction * p + (reduction - 1) / 2 + offset``. libjpeg averages
               each ``reduction``-square block into one pixel; an axis that the
               orientation reverses starts with the last, partial block, hence the offset.
               JPEG 2000's low-pass sample ``p`` sits on full-size pixel ``reduction * p``
               (its wavelet filters are centred on the even samples): offset
               ``-(reduction - 1) / 2`` on both axes.
    """

    pixels: np.ndarray
    reduction: int
    full_size: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode JPEG, PNG, WebP, HEIC/HEIF, AVIF or JPEG 2000 bytes, or a DG2's portrait, to a
    C-contiguous (H, W, 3) uint8 RGB array.

    Raises EmptyImage, ImageTooLarge, UnsupportedImage, CorruptImage or DocumentUnreadable
    (all InvalidInput).
    """
    return _decode(data, limits, 1, 0).pixels


def decode_reduced(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, *,
                   max_reduction: int = 8, min_long_side: int = 0) -> ReducedImage:
    """Like ``decode_image``, but a JPEG or JPEG 2000 is decoded at the largest reduction
    (2, 4 or 8, at most ``max_reduction``; for JPEG 2000 at most 2**levels) that leaves its
    long side >= ``min_long_side`` pixels.

    Limits are checked on the full size the header declares, exactly as decode_image does.
    Other formats, and images no reduction fits, decode at full size (reduction 1).
    """
    if max_reduction < 1:
        raise ValueError(f"max_reduction must be >= 1, got: {max_reduction}")
    return _decode(data, limits, max_reduction, min_long_side)


def _decode(data: bytes, limits: DecodeLimits, max_reduction: int,
            min_long_side: int) -> ReducedImage:
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"the image is {len(data) / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.1f} MB")
    if is_document(data):
        portrait = read_portrait(data)
        try:
            return _decode_image(portrait.image, limits, max_reduction, min_long_side)
        except InvalidInput as exc:
            raise DocumentUnreadable("image", f"its portrait: {exc}") from None
    return _decode_image(data, limits, max_reduction, min_long_side)


def _decode_image(data: bytes, limits: DecodeLimits, max_reduction: int,
                  min_long_side: int) -> ReducedImage:
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    j2k = jpeg2000.read_header(data) if fmt == "JPEG2000" else None
    declared = j2k.size if j2k is not None else _declared_size(fmt, data)
    if declared is not None:
        # Before any decoder sees the bytes: libwebp allocates the whole canvas when it opens
        # a file, and a HEIF/AVIF parser may size buffers from the same header.
        _check_dimensions(declared, limits)
    image = _open_header(data, fmt, limits)
    _check_dimensions(image.size, limits)
    _check_single_frame(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            stored = image.size
            if fmt == "JPEG":
                reduction = _draft(image, max_reduction, min_long_side)
            elif j2k is not None:
                reduction = _reduce_jpeg2000(image, j2k, max_reduction, min_long_side)
            else:
                reduction = 1
            # The header's EXIF (exif_transpose reads the same cached copy below).
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1) \
                if reduction > 1 else 1
            image.load()
            # In place: no full-image copy when the orientation is already upright.
            ImageOps.exif_transpose(image, in_place=True)
        pixels = _to_rgb(image)
    except (ImageTooLarge, UnsupportedImage):
        raise
    except Image.DecompressionBombWarning:
        raise ImageTooLarge("the image declares more pixels than allowed") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(
            f"the {fmt} image could not be decoded ({type(exc).__name__}); "
            "it is truncated or damaged, please capture it again") from None
    if reduction == 1:
        return ReducedImage(pixels, 1, (pixels.shape[1], pixels.shape[0]))
    if j2k is not None:  # no EXIF orientation; the low-pass samples sit on even pixels
        shift = -(reduction - 1) / 2
        return ReducedImage(pixels, reduction, stored, (shift, shift))
    swap = orientation in (5, 6, 7, 8)
    full_w, full_h = (stored[1], stored[0]) if swap else stored
    reversed_x, reversed_y = _REVERSED_AXES.get(orientation, (False, False))
    offset = (float(full_w - reduction * pixels.shape[1]) if reversed_x else 0.0,
              float(full_h - reduction * pixels.shape[0]) if reversed_y else 0.0)
    return ReducedImage(pixels, reduction, (full_w, full_h), offset)


def _draft(image: Image.Image, max_reduction: int, min_long_side: int) -> int:
    """Ask libjpeg for DCT scaling before any pixel is decoded; returns the reduction."""
    long_side = max(image.size)
    for reduction in JPEG_REDUCTIONS:
        if reduction <= max_reduction and -(-long_side // reduction) >= min_long_side:
            width, height = image.size
            # draft() picks the largest factor with size // factor >= the size asked for.
            result = image.draft(None, (width // reduction, height // reduction))
            if result is None:  # a JPEG Pillow cannot scale (e.g. more than one tile)
                return 1
            return round(width / result[1][2])
    return 1


def _reduce_jpeg2000(image: Image.Image, header: jpeg2000.Jpeg2000Header, max_reduction: int,
                     min_long_side: int) -> int:
    """Ask OpenJPEG for a lower resolution level before any pixel is decoded; returns the
    reduction (1 when none fits).

    Only where Pillow's size for the reduced image is OpenJPEG's: Pillow 13 rounds
    size / 2**r half up, OpenJPEG takes the ceiling (of the image area on the reference
    grid), and where they differ the decode fails. So the image must sit at the grid's
    origin and each side round the same way.
    """
    if header.origin != (0, 0) or not isinstance(image, Jpeg2KImagePlugin.Jpeg2KImageFile):
        return 1
    for reduction in JPEG_REDUCTIONS:
        levels = reduction.bit_length() - 1
        if reduction > max_reduction or levels > header.levels \
                or -(-max(header.size) // reduction) < min_long_side:
            continue
        if all((side + reduction // 2) // reduction == -(-side // reduction)
               for side in header.size):
            image.reduce = levels
            return reduction
    return 1


def sniff_format(data: bytes) -> str:
    """The Pillow format name of ``data`` from its magic bytes (never a file name).

    Raises UnsupportedImage, naming the format where it is a known one we do not accept.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if jpeg2000.is_jpeg2000(data):
        return "JPEG2000"
    if data[4:8] == b"ftyp":
        (box_size,) = struct.unpack(">I", data[:4])
        major = data[8:12]
        # Compatible brands follow the major brand and its minor version.
        compatible = {data[i:i + 4] for i in range(16, min(box_size, len(data), 64) - 3, 4)}
        if major in _AVIF_BRANDS or (major in (b"mif1", b"msf1") and compatible & _AVIF_BRANDS):
            return "AVIF"
        if major in _HEIF_BRANDS or compatible & (_HEIF_BRANDS - {b"mif1", b"msf1"}):
            return "HEIF"
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            raise UnsupportedImage(f"the image is a {name} file; send {ACCEPTED_NAMES}")
    raise UnsupportedImage(f"the bytes are not a {ACCEPTED_NAMES} image "
                           "(unknown or unsupported format)")


def _declared_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) the header declares, for formats whose decoder allocates on open.

    None when the header does not say (the decoder then refuses it, or Pillow's size is
    checked after opening, before any pixel is decoded).
    """
    if fmt == "WEBP":
        return _webp_size(data)
    if fmt in ("HEIF", "AVIF"):
        return _isobmff_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from the first chunk: VP8X (extended), VP8 (lossy) or VP8L (lossless)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# The boxes on the path meta/iprp/ipco to the image spatial extents ('ispe') properties.
_CONTAINER_BOXES = {b"meta": 4, b"iprp": 0, b"ipco": 0}  # type -> header bytes to skip


def _isobmff_size(data: bytes) -> tuple[int, int] | None:
    """The largest width and height of any 'ispe' property of a HEIF/AVIF file.

    The primary image, its tiles and thumbnails each have one; the largest bounds what any
    of them decodes to, and a lie in a smaller one is caught after opening.
    """
    sizes = [(w, h) for w, h in _ispe_boxes(data, 0, len(data), depth=0)]
    if not sizes:
        return None
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def _ispe_boxes(data: bytes, start: int, end: int, depth: int):
    pos = start
    while pos + 8 <= end and depth <= 3:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1 and pos + 16 <= end:  # 64-bit size
            (size,) = struct.unpack(">Q", data[pos + 8:pos + 16])
            header = 16
        elif size == 0:  # to the end of the file
            size = end - pos
        if size < header or pos + size > end:
            return  # a damaged box: the decoder will say so
        if kind == b"ispe" and size >= header + 12:
            yield struct.unpack(">II", data[pos + header + 4:pos + header + 12])
        elif kind in _CONTAINER_BOXES:
            yield from _ispe_boxes(data, pos + header + _CONTAINER_BOXES[kind], pos + size,
                                   depth + 1)
        pos += size


def _open_header(data: bytes, fmt: str, limits: DecodeLimits) -> Image.Image:
    """Parse only the header; the decoders decode pixels lazily on ``load()``."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; our own limit refuses it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=(fmt,))
    except UnidentifiedImageError:
        raise CorruptImage(f"the {fmt} image header is damaged or incomplete; "
                           "please capture it again") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"the image declares far more pixels than the {limits.max_pixels / 1e6:.0f} "
            "megapixel limit") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(f"the {fmt} image header is damaged ({type(exc).__name__}); "
                           "please capture it again") from None


def _check_dimensions(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} pixels; the limit is {limits.max_pixels / 1e6:.0f} "
            f"megapixels and {limits.max_side} pixels per side")
    if width < limits.min_side or height < limits.min_side:
        raise UnsupportedImage(
            f"the image is {width}x{height} pixels; at least {limits.min_side} per side is needed")


def _check_single_frame(image: Image.Image) -> None:
    """Refuse animated PNG, WebP and AVIF: which frame holds the face would be a guess.

    The frame count comes with the header, so this costs nothing. JPEGs are exempt:
    cameras write MPO files (a JPEG plus preview or depth frames) whose first frame is the
    photo; so are HEIF collections (bursts, edits), whose primary image is the photo and
    is the one decoded.
    """
    frames = getattr(image, "n_frames", 1)
    if image.format in ("PNG", "WEBP", "AVIF") and frames > 1:
        raise UnsupportedImage(
            f"the {image.format} is animated ({frames} frames); send a single still photo")


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PNG, or 10/12-bit HEIF scaled to 16): scale to 8 bits instead of
        # letting convert() clip at 255.
        grey = np.asarray(image, dtype=np.uint32)
        grey8 = (np.minimum(grey, 65535) // 257).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if mode == "F":
        raise UnsupportedImage("floating-point images are not supported; send an 8 or 16-bit "
                               "photo")
    if mode != "RGB":
        # Covers L, LA, P, PA, RGBA (alpha dropped as the reference pipeline does), CMYK, 1.
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UnsupportedImage(f"unsupported colour layout {array.shape}")
    return np.ascontiguousarray(array)
