"""Image bytes -> (H, W, 3) uint8 RGB, refusing anything unsafe before it is decoded.

The header is read first: byte and pixel limits are checked there, so a 20,000 x 20,000
"decompression bomb" costs a few hundred bytes of parsing and no allocation. EXIF
orientation is applied, so a phone photo stored sideways is matched upright.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CorruptImage, EmptyImage, ImageTooLarge, UnsupportedImage

ACCEPTED_FORMATS = ("JPEG", "PNG")


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


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode JPEG or PNG bytes to a C-contiguous (H, W, 3) uint8 RGB array.

    Raises EmptyImage, ImageTooLarge, UnsupportedImage or CorruptImage (all InvalidInput).
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"the image is {len(data) / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.1f} MB")
    image = _open_header(data, limits)
    _check_dimensions(image.size, limits)
    _check_single_frame(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            # In place: no full-image copy when the orientation is already upright.
            ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except (ImageTooLarge, UnsupportedImage):
        raise
    except Image.DecompressionBombWarning:
        raise ImageTooLarge("the image declares more pixels than allowed") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            Image.DecompressionBombError) as exc:
        raise CorruptImage(
            f"the {image.format} image could not be decoded ({type(exc).__name__}); "
            "it is truncated or damaged, please capture it again") from None


def _open_header(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Parse only the header; Pillow decodes pixels lazily on ``load()``."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; our own limit refuses it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage(
            "the bytes are not a JPEG or PNG image (unknown or unsupported format)") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"the image declares far more pixels than the {limits.max_pixels / 1e6:.0f} "
            "megapixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise CorruptImage(f"the image header is damaged ({type(exc).__name__}); "
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
    """Refuse animated PNGs: which frame holds the traveller's face would be a guess.

    The frame count comes from the acTL chunk read with the header, so this costs nothing.
    JPEGs are exempt: cameras write MPO files (a JPEG plus preview or depth frames) whose
    first frame is the photo.
    """
    if image.format == "PNG" and getattr(image, "n_frames", 1) > 1:
        raise UnsupportedImage(
            f"the PNG is animated ({image.n_frames} frames); send a single still photo")


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of letting convert() clip at 255.
        grey = np.asarray(image, dtype=np.uint32)
        grey8 = (np.minimum(grey, 65535) // 257).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if mode == "F":
        raise UnsupportedImage("floating-point images are not supported; send 8 or 16-bit JPEG/PNG")
    if mode != "RGB":
        # Covers L, LA, P, PA, RGBA (alpha dropped as the reference pipeline does), CMYK, 1.
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UnsupportedImage(f"unsupported colour layout {array.shape}")
    return np.ascontiguousarray(array)
