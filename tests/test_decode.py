"""decode_image: every odd, broken or hostile input gets a typed error or a correct RGB array.

All test images are generated here with Pillow/numpy (or written byte by byte where Pillow
cannot produce them); the WebP, AVIF and HEIC files are encoded at test time from the
committed test photos by the real encoders (Pillow's WebP and AVIF, pillow-heif's HEIC).
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from image_bombs import ispe_bomb, webp_bomb
from PIL import Image

from matcher.errors import CorruptImage, EmptyImage, ImageTooLarge, InvalidInput, UnsupportedImage
from matcher.face.decode import (
    DEFAULT_LIMITS,
    DecodeLimits,
    decode_image,
    decode_reduced,
    sniff_format,
)


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
    with pytest.raises(UnsupportedImage,
                       match="not a JPEG, PNG, WebP, HEIC/HEIF, AVIF or JPEG 2000"):
        decode_image(b"this is a booking confirmation, not a photo" * 10)
    with pytest.raises(UnsupportedImage, match="is a PDF file"):
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


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_unsupported_and_named(fmt: str) -> None:
    data = _encode(Image.fromarray(_gradient()), fmt)
    with pytest.raises(UnsupportedImage, match=f"is a {fmt} file; send JPEG, PNG, WebP"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "AVIF"])
def test_animated_images_are_refused(fmt: str) -> None:
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 100, 200)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImage, match=f"{fmt} is animated \\(3 frames\\)"):
        decode_image(data)


def test_every_refusal_is_an_invalid_input() -> None:
    """service/servicer.py maps InvalidInput to one status code; no other exception type leaks."""
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


# -- the formats phones and web forms upload: WebP, AVIF, HEIC ----------------------------

MODERN = ("WEBP", "AVIF", "HEIF")


def _as_bytes(fmt: str, image: Image.Image, **kwargs) -> bytes:
    """Encoded by the real encoder; lossy at quality 90 unless told otherwise."""
    return _encode(image, fmt, **{"quality": 90, **kwargs})


@pytest.mark.parametrize("fmt", MODERN)
def test_modern_formats_decode_to_the_same_pixels(fmt: str) -> None:
    pixels = _gradient(96, 128)
    data = _as_bytes(fmt, Image.fromarray(pixels))
    assert sniff_format(data) == fmt
    out = decode_image(data)
    _check_rgb(out, 96, 128)
    assert np.abs(out.astype(int) - pixels).mean() < 3  # lossy, but the same picture


def test_lossless_webp_round_trips_exactly() -> None:
    pixels = _gradient()
    np.testing.assert_array_equal(
        decode_image(_encode(Image.fromarray(pixels), "WEBP", lossless=True)), pixels)


def test_the_format_comes_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    """One upload in sixty is a WebP named .jpg: it is decoded as the WebP it is."""
    pixels = _gradient()
    named_jpg = tmp_path / "booking.jpg"
    named_jpg.write_bytes(_encode(Image.fromarray(pixels), "WEBP", lossless=True))
    np.testing.assert_array_equal(decode_image(named_jpg.read_bytes()), pixels)


@pytest.mark.parametrize("fmt", MODERN)
def test_modern_formats_honour_the_stored_orientation(fmt: str) -> None:
    """Pixels stored sideways with orientation 6 come back upright: EXIF for WebP, irot
    written by the encoder for AVIF and HEIC (pillow-heif turns the EXIF tag into irot)."""
    pixels = _gradient(64, 96)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=1)))
    out = decode_image(_as_bytes(fmt, stored, exif=exif.tobytes()))
    _check_rgb(out, 64, 96)
    assert np.abs(out.astype(int) - pixels).mean() < 3


@pytest.mark.parametrize("fmt", MODERN)
def test_grey_modern_formats_become_three_equal_channels(fmt: str) -> None:
    grey = _gradient()[:, :, 0]
    out = decode_image(_as_bytes(fmt, Image.fromarray(grey, "L")))
    _check_rgb(out, *grey.shape)
    # WebP has no grey mode: the encoder stores grey as colour, equal to a rounding step.
    spread = np.ptp(out.astype(int), axis=2).max()
    assert spread <= (2 if fmt == "WEBP" else 0)
    assert np.abs(out[:, :, 0].astype(int) - grey).mean() < 3


def test_10_bit_grey_heic_is_scaled_not_clipped() -> None:
    """pillow-heif writes 16-bit grey as a 10-bit HEIC and reads it back as I;16."""
    grey = np.linspace(0, 65535, 64 * 96).reshape(64, 96).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(grey), "HEIF", quality=-1))
    _check_rgb(out, 64, 96)
    assert out.max() >= 250 and out.min() <= 2
    assert np.abs(out[:, :, 0].astype(int) - grey // 257).max() <= 2


def test_10_bit_rgb_heic_keeps_its_colours() -> None:
    import pillow_heif

    rgb16 = (_gradient().astype(np.uint16) * 257)
    heif = pillow_heif.from_bytes("RGB;16", (rgb16.shape[1], rgb16.shape[0]), rgb16.tobytes())
    buf = io.BytesIO()
    heif.save(buf, quality=-1)
    out = decode_image(buf.getvalue())
    _check_rgb(out, *rgb16.shape[:2])
    assert np.abs(out.astype(int) - _gradient()).mean() < 3


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", "HEIF"])
@pytest.mark.parametrize("size", [(30_000, 30_000), (DEFAULT_LIMITS.max_side + 1, 64)])
def test_modern_bomb_headers_are_refused_from_the_header(fmt: str, size) -> None:
    small = _as_bytes(fmt, Image.fromarray(_gradient(64, 64)))
    bomb = webp_bomb(small, *size) if fmt == "WEBP" else ispe_bomb(small, *size)
    with pytest.raises(ImageTooLarge, match=f"{size[0]}x{size[1]} pixels"):
        decode_image(bomb)


def test_lossy_webp_at_its_largest_simple_size_is_refused() -> None:
    """The simple (VP8) header holds at most 16383 x 16383 (268 MP)."""
    data = bytearray(_as_bytes("WEBP", Image.fromarray(_gradient(64, 64))))
    assert data[12:16] == b"VP8 "
    data[26:30] = struct.pack("<HH", 16383, 16383)
    with pytest.raises(ImageTooLarge):
        decode_image(bytes(data))


_BOMBS_UNDER_AN_ADDRESS_SPACE_LIMIT = r"""
import io, resource, struct, sys
sys.path.insert(0, sys.argv[1])
from image_bombs import ispe_bomb, j2k_bomb, webp_bomb
from test_decode import _as_bytes, _encode, _gradient
from PIL import Image
from matcher.face.decode import decode_image
from matcher.errors import ImageTooLarge
small = {f: _as_bytes(f, Image.fromarray(_gradient(64, 64))) for f in ("WEBP", "AVIF", "HEIF")}
bombs = {"WEBP": webp_bomb(small["WEBP"], 30000, 30000),
         "AVIF": ispe_bomb(small["AVIF"], 30000, 30000),
         "HEIF": ispe_bomb(small["HEIF"], 30000, 30000),
         "J2K": j2k_bomb(_encode(Image.fromarray(_gradient(64, 64)), "JPEG2000", no_jp2=True),
                         30000, 30000),
         "JP2": j2k_bomb(_encode(Image.fromarray(_gradient(64, 64)), "JPEG2000"), 30000, 30000)}
# From here no allocation may come near one 30,000 x 30,000 canvas (2.7 GB as RGB).
limit = 1 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for fmt, bomb in bombs.items():
    try:
        decode_image(bomb)
    except ImageTooLarge:
        print(fmt, "refused")
"""


def test_bomb_headers_are_refused_before_any_canvas_is_allocated(tmp_path: Path) -> None:
    """Under a 1 GB address-space limit a decoder that sized a buffer from the header would
    fail (libwebp allocates the canvas when it opens a file); the header check never lets
    it run. In a child process so the limit stays there."""
    script = tmp_path / "bombs.py"
    script.write_text(_BOMBS_UNDER_AN_ADDRESS_SPACE_LIMIT)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["WEBP", "refused", "AVIF", "refused", "HEIF", "refused",
                                   "J2K", "refused", "JP2", "refused"]


@pytest.mark.parametrize("fmt", MODERN)
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_modern_formats_are_corrupt(fmt: str, keep: float) -> None:
    noise = np.random.default_rng(4).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    data = _as_bytes(fmt, Image.fromarray(noise))
    with pytest.raises(CorruptImage):
        decode_image(data[: int(len(data) * keep)])


# Re-encoded real photos: the service must see the same traveller in any of them.
_TEMPLATE_PHOTOS = ("obama_4.jpg", "kit_harington_1.jpg", "rose_leslie_1.jpg")


@pytest.fixture(scope="module")
def reencoded(faces_dir: Path) -> dict[str, dict[str, bytes]]:
    """file -> {"JPEG": original bytes, fmt: the decoded original re-encoded as fmt}."""
    out = {}
    for file in _TEMPLATE_PHOTOS:
        original = (faces_dir / file).read_bytes()
        upright = Image.fromarray(decode_image(original))
        out[file] = {"JPEG": original, **{fmt: _as_bytes(fmt, upright) for fmt in MODERN}}
    return out


@pytest.mark.parametrize("fmt", MODERN)
def test_templates_of_reencoded_photos_match_the_jpeg_original(fmt: str, reencoded,
                                                               pipeline) -> None:
    for file, versions in reencoded.items():
        (original,) = pipeline.analyse_bytes(versions["JPEG"])
        (again,) = pipeline.analyse_bytes(versions[fmt])
        cosine = float(original.template @ again.template)
        assert cosine >= 0.99, f"{file} as {fmt}: cosine {cosine:.4f} to the JPEG original"


# -- fuzz: damaged bytes either decode or raise InvalidInput, nothing else --------------

_FUZZ_SOURCES = {
    "jpeg": _encode(Image.fromarray(_gradient(64, 80)), "JPEG", quality=80),
    "png": _encode(Image.fromarray(_gradient(64, 80)), "PNG"),
    "webp": _encode(Image.fromarray(_gradient(64, 80)), "WEBP", quality=80),
    "avif": _encode(Image.fromarray(_gradient(64, 80)), "AVIF", quality=80),
    "heic": _encode(Image.fromarray(_gradient(64, 80)), "HEIF", quality=80),
    "jp2": _encode(Image.fromarray(_gradient(64, 80)), "JPEG2000", quality_mode="rates",
                   quality_layers=[20], irreversible=True),
    "j2k": _encode(Image.fromarray(_gradient(64, 80)), "JPEG2000", no_jp2=True),
}


@settings(max_examples=100, deadline=None)
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


# -- DCT-scaled JPEG decoding -----------------------------------------------------------

def _jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _bright_centroid(pixels: np.ndarray) -> tuple[float, float]:
    weight = pixels[..., 0].astype(np.float64) - 20
    weight[weight < 60] = 0
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_maps_back_onto_the_full_decode(orientation: int) -> None:
    """A bright square lands where the full decode has it, for every EXIF orientation and
    reduction, on an image whose sides are not multiples of 8 (partial DCT blocks)."""
    pixels = np.full((803, 997, 3), 20, np.uint8)
    pixels[300:312, 600:612] = 240
    data = _jpeg_with_orientation(pixels, orientation)
    full = decode_image(data)
    fx, fy = _bright_centroid(full)
    for reduction in (2, 4, 8):
        reduced = decode_reduced(data, max_reduction=reduction)
        assert reduced.reduction == reduction
        assert reduced.full_size == (full.shape[1], full.shape[0])
        assert reduced.pixels.shape[:2] == (-(-full.shape[0] // reduction),
                                            -(-full.shape[1] // reduction))
        x, y = _bright_centroid(reduced.pixels)
        half = (reduction - 1) / 2
        assert reduction * x + half + reduced.offset[0] == pytest.approx(fx, abs=0.05)
        assert reduction * y + half + reduced.offset[1] == pytest.approx(fy, abs=0.05)


def test_reduction_keeps_the_long_side_asked_for() -> None:
    data = _encode(Image.fromarray(_gradient(1500, 2600)), "JPEG", quality=90)
    assert decode_reduced(data, min_long_side=640).reduction == 4      # 650 px >= 640
    assert decode_reduced(data, min_long_side=700).reduction == 2
    assert decode_reduced(data, min_long_side=3000).reduction == 1
    assert decode_reduced(data, max_reduction=1).pixels.shape == (1500, 2600, 3)
    assert decode_reduced(data, max_reduction=3).reduction == 2


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_only_jpegs_are_reduced(fmt: str) -> None:
    data = _encode(Image.fromarray(_gradient(900, 1300)), fmt)
    reduced = decode_reduced(data, max_reduction=8)
    assert reduced.reduction == 1 and reduced.pixels.shape == (900, 1300, 3)


def test_reduced_decode_checks_limits_on_the_full_size() -> None:
    """The header's full size is what the limits see, not the reduced one."""
    data = _encode(Image.fromarray(_gradient(600, 1300)), "JPEG", quality=80)
    limits = DecodeLimits(max_side=1000)
    with pytest.raises(ImageTooLarge):
        decode_reduced(data, limits, max_reduction=8)
    with pytest.raises(CorruptImage):
        decode_reduced(data[: len(data) // 2], max_reduction=2)
