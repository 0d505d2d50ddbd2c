"""A small ICAO 9303 DG2 writer for tests and benchmarks: wraps a JPEG or JPEG 2000 portrait
the way a passport issuer's personalisation system does (ICAO 9303-10 4.7.2, ISO/IEC
19794-5:2005), plus the pieces hostile documents are built from.

Written from the structure the standards describe, independently of the parser in
matcher/face/document.py, so a round trip tests one reading of the standard against
another rather than a parser against itself.
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

JPEG, JPEG2000 = 0, 1        # 19794-5 image data type
FULL_FRONTAL = 1             # 19794-5 face image type
RGB24 = 1                    # 19794-5 image colour space
SCANNED_PHOTO, DIGITAL_CAMERA = 4, 2   # 19794-5 source type
ICAO_PORTRAIT = (413, 531)   # width, height: 35 x 45 mm at 300 dpi


def ber_length(n: int) -> bytes:
    """Definite BER length: short form below 128, else 0x81..0x84 and the bytes."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    """One element: the tag's bytes as written (1-3), a definite length, the value."""
    return tag.to_bytes((tag.bit_length() + 7) // 8, "big") + ber_length(len(value)) + value


def feature_point(kind: int, code: int, x: int, y: int) -> bytes:
    """A 19794-5 feature point: type 1 (MPEG-4), code major << 4 | minor, x, y, reserved."""
    return struct.pack(">BBHHH", kind, code, x, y, 0)


def facial_record(image: bytes, data_type: int, width: int, height: int, *,
                  points: tuple[bytes, ...] = (), source: int = DIGITAL_CAMERA,
                  faces: int = 1, record_length: int | None = None,
                  face_length: int | None = None) -> bytes:
    """An ISO/IEC 19794-5:2005 record with one face image; the lengths can be overridden to
    lie (hostile documents)."""
    info = struct.pack(">IHBBB3sH3s3s", 0, len(points), 0, 0, 0, b"\x00\x00\x00", 0,
                       b"\x00\x00\x00", b"\x00\x00\x00")
    assert len(info) == 20
    image_info = struct.pack(">BBHHBBHH", FULL_FRONTAL, data_type, width, height, RGB24,
                             source, 0, 0)
    body = info[4:] + b"".join(points) + image_info + image
    face = struct.pack(">I", face_length if face_length is not None else 4 + len(body)) + body
    total = 14 + len(face)
    header = (b"FAC\x00" + b"010\x00"
              + struct.pack(">IH", record_length if record_length is not None else total, faces))
    return header + face


def biometric_header(format_type: int = 0x0008) -> bytes:
    """A1: ICAO header version, biometric type face, creation date, format owner and type."""
    return tlv(0xA1, tlv(0x80, b"\x01\x01") + tlv(0x81, b"\x02") + tlv(0x82, b"\x00")
               + tlv(0x83, bytes.fromhex("20260115093000"))
               + tlv(0x87, b"\x01\x01") + tlv(0x88, format_type.to_bytes(2, "big")))


def dg2(record: bytes, *, instances: int = 1, bdb_tag: int = 0x5F2E,
        format_type: int = 0x0008) -> bytes:
    """DG2 holding ``instances`` copies of one biometric information template."""
    bit = tlv(0x7F60, biometric_header(format_type) + tlv(bdb_tag, record))
    group = tlv(0x02, bytes([instances])) + bit * instances
    return tlv(0x75, tlv(0x7F61, group))


def encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def chip_jpeg2000(pixels: np.ndarray, target_bytes: int, codestream: bool = False) -> bytes:
    """JPEG 2000 at about ``target_bytes`` (irreversible 9/7, one layer at the compression
    ratio the budget gives), as chip portraits are: JP2 file or bare J2K codestream."""
    ratio = pixels.size / target_bytes
    return encode(pixels, "JPEG2000", quality_mode="rates", quality_layers=[ratio],
                  irreversible=True, no_jp2=codestream)


def portrait_dg2(pixels: np.ndarray, data_type: int, target_bytes: int | None = None,
                 codestream: bool = True, quality: int = 90) -> bytes:
    """A DG2 around ``pixels`` (H, W, 3) uint8 encoded as a chip holds it: JPEG, or JPEG
    2000 (a raw codestream by default, as most chips store it; ``target_bytes`` None:
    about 1 bit a pixel). Eye feature points are not written (issuers often leave them
    out)."""
    h, w = pixels.shape[:2]
    if data_type == JPEG:
        image = encode(pixels, "JPEG", quality=quality)
    else:
        image = chip_jpeg2000(pixels, target_bytes or (w * h) // 8, codestream)
    return dg2(facial_record(image, data_type, w, h))
