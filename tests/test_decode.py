"""decode_image: every odd, broken or hostile input gets a typed error or a correct RGB array.

All test images are generated here with Pillow/numpy (or written byte by byte where Pillow
cannot produce them); nothing binary is committed.
"""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from matcher.decode import DEFAULT_LIMITS, DecodeLimits, decode_image
from matcher.errors import CorruptImage, EmptyImage, ImageTooLarge, InvalidInput, UnsupportedImage


def _gradient(h: int = 96, w: int = 128) -> np.ndarray:
    """(h, w, 3) uint8 with distinct smooth channels, so colour-order mistakes show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)],
                    axis=2).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int,
             rows: bytes | None) -> bytes:
    """A PNG written by hand: Pillow cannot save 48-bit RGB, nor a header without pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr)
    if rows is not None:
        body += _png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


# -- refused inputs ---------------------------------------------------------------------

def test_empty_bytes_are_refused() -> None:
    with pytest.raises(EmptyImage):
        decode_image(b"")


def test_random_bytes_are_not_an_image() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedImage):
        decode_image(noise)


def test_text_is_not_an_image() -> None:
    with pytest.raises(UnsupportedImage, match="not a JPEG or PNG"):
        decode_image(b"%PDF-1.7 this is a document, not a photo" * 10)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_corrupt(keep: float) -> None:
    data = _encode(Image.fromarray(_gradient(256, 256)), "JPEG", quality=90)
    with pytest.raises(CorruptImage, match="truncated or damaged"):
        decode_image(data[: int(len(data) * keep)])


def test_jpeg_cut_inside_header_is_refused() -> None:
    data = _encode(Image.fromarray(_gradient()), "JPEG")
    with pytest.raises((CorruptImage, UnsupportedImage)):
        decode_image(data[:40])


@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_truncated_png_is_corrupt(keep: float) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "PNG")
    with pytest.raises(CorruptImage):
        decode_image(data[: int(len(data) * keep)])


def test_png_with_damaged_pixel_data_is_corrupt() -> None:
    data = bytearray(_encode(Image.fromarray(_gradient(128, 128)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20: idat + 60] = b"\xff" * 40  # breaks the zlib stream (and the CRC)
    with pytest.raises(CorruptImage):
        decode_image(bytes(data))


def test_decompression_bomb_header_is_refused_without_allocating() -> None:
    """A 20000x20000 PNG header (1.2 GB of RGB once decoded) costs a few hundred bytes."""
    bomb = _raw_png(20_000, 20_000, 8, 2, rows=None)
    assert len(bomb) < 100
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match="megapixel"):
            decode_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"refusing the bomb allocated {peak} bytes"


def test_bomb_between_pillow_warning_and_error_is_refused_by_our_limit() -> None:
    """50 MP: above our 40 MP limit but below Pillow's own 2x error threshold."""
    with pytest.raises(ImageTooLarge):
        decode_image(_raw_png(10_000, 5_000, 8, 2, rows=None))


def test_one_absurdly_long_side_is_refused() -> None:
    with pytest.raises(ImageTooLarge, match="per side"):
        decode_image(_raw_png(DEFAULT_LIMITS.max_side + 1, 40, 8, 2, rows=None))


def test_too_many_bytes_are_refused_before_parsing() -> None:
    limits = DecodeLimits()
    data = b"\xff\xd8\xff" + bytes(limits.max_bytes)  # JPEG magic, then 20 MB of nothing
    with pytest.raises(ImageTooLarge, match="MB"):
        decode_image(data, limits)


def test_tiny_image_is_refused() -> None:
    with pytest.raises(UnsupportedImage, match="at least"):
        decode_image(_encode(Image.fromarray(_gradient(16, 16)), "PNG"))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    data = _encode(Image.fromarray(_gradient()), fmt)
    with pytest.raises(UnsupportedImage, match="JPEG or PNG"):
        decode_image(data)


def test_animated_png_is_refused() -> None:
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 100, 200)]
    data = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImage, match="animated"):
        decode_image(data)


def test_every_refusal_is_an_invalid_input() -> None:
    """service.py maps InvalidInput to one status code; no other exception type leaks."""
    rng = np.random.default_rng(2)
    good = _encode(Image.fromarray(_gradient()), "JPEG")
    for data in (b"", rng.bytes(100), good[:200], good[:-300], b"\x89PNG\r\n\x1a\n" + rng.bytes(64),
                 b"\xff\xd8\xff\xe0" + rng.bytes(500)):
        with pytest.raises(InvalidInput):
            decode_image(data)


# -- accepted inputs, decoded correctly -------------------------------------------------

def _check_rgb(array: np.ndarray, h: int, w: int) -> None:
    assert array.shape == (h, w, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


def test_rgb_png_round_trips_exactly() -> None:
    pixels = _gradient()
    out = decode_image(_encode(Image.fromarray(pixels), "PNG"))
    _check_rgb(out, *pixels.shape[:2])
    np.testing.assert_array_equal(out, pixels)


def test_rgba_png_drops_alpha() -> None:
    pixels = _gradient()
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)])
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, pixels)


def test_palette_png_is_expanded() -> None:
    image = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out = decode_image(_encode(image, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(grey), "PNG"))
    _check_rgb(out, 64, 64)
    np.testing.assert_array_equal(out[:, :, 0], (grey // 257).astype(np.uint8))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    assert out.max() == 255 and out.min() == 0


def test_16bit_rgb_png_keeps_the_high_bytes() -> None:
    rng = np.random.default_rng(3)
    rgb16 = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    out = decode_image(_raw_png(48, 40, 16, 2, rows))
    _check_rgb(out, 40, 48)
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_grey_jpeg_becomes_three_equal_channels() -> None:
    grey = _gradient()[:, :, 0]
    out = decode_image(_encode(Image.fromarray(grey, "L"), "JPEG", quality=95))
    _check_rgb(out, *grey.shape)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    assert np.abs(out[:, :, 0].astype(int) - grey).mean() < 2


def test_cmyk_jpeg_decodes_to_the_same_colours() -> None:
    pixels = _gradient()
    data = _encode(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95)
    out = decode_image(data)
    _check_rgb(out, *pixels.shape[:2])
    assert np.abs(out.astype(int) - pixels).mean() < 4


def test_exif_orientation_is_applied() -> None:
    """Pixels stored 90 degrees rotated with orientation 6 come back upright."""
    pixels = _gradient(64, 96)
    stored = np.rot90(pixels, k=1)  # what a sideways phone writes for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(np.ascontiguousarray(stored)), "PNG", exif=exif)
    out = decode_image(data)
    np.testing.assert_array_equal(out, pixels)


# -- fuzz: damaged bytes either decode or raise InvalidInput, nothing else --------------

_FUZZ_SOURCES = {
    "jpeg": _encode(Image.fromarray(_gradient(64, 80)), "JPEG", quality=80),
    "png": _encode(Image.fromarray(_gradient(64, 80)), "PNG"),
}


@settings(max_examples=60, deadline=None)
@given(source=st.sampled_from(sorted(_FUZZ_SOURCES)),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.integers(1, 10_000))
def test_damaged_bytes_never_escape_as_other_errors(source: str, flips, cut: int) -> None:
    data = bytearray(_FUZZ_SOURCES[source])
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        out = decode_image(data)
    except InvalidInput:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
