"""Hostile images against matcher.face.decode.decode_image, structure-aware.

tests/test_decode.py flips raw bytes; here the mutations keep the container valid (PNG chunk
CRCs recomputed, JPEG markers kept in place, WebP chunks and HEIF/AVIF boxes walked) so the
damage reaches the pixel decoders, and the bases are crops of the real test photos,
encoded at test time by the real encoders, in every format the service accepts (JPEG, PNG,
WebP still and animated, HEIC/HEIF, AVIF still and animated, JPEG 2000 as JP2 file and raw
codestream), and passport DG2s around JPEG and JPEG 2000 portraits (tests/dg2_writer.py).
Every case must end as a (H, W, 3) uint8 array within the limits or as an InvalidInput;
anything else (MemoryError, a raw zlib.error, a libheif RuntimeError, a hang) fails.
Each case is counted by the decoder its bytes reach (the format sniffed from them) and its
outcome.
"""
from __future__ import annotations

import io
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dg2_writer import JPEG, JPEG2000, dg2, facial_record
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from image_bombs import ispe_bomb, j2k_bomb, webp_bomb
from PIL import Image

from matcher.errors import ImageTooLarge, InvalidInput, UnsupportedImage
from matcher.face.decode import DEFAULT_LIMITS, decode_image, sniff_format
from matcher.face.document import is_document

# Refusing a bomb means reading a header, not decoding pixels (a 40+ megapixel decode takes
# seconds). The default run reports the slowest refusal; only --soak holds it to this bound,
# because a busy machine can stall any single call.
BOMB_REFUSAL_BOUND_S = 0.5


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG."""
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return chunks


def _png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for ctype, payload in chunks:
        crc = zlib.crc32(ctype + payload) & 0xFFFFFFFF
        out.append(struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", crc))
    return b"".join(out)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bases(faces_dir: Path) -> dict[str, bytes]:
    """Small real-photo images in the encodings lanes send (and a few they should not)."""
    with Image.open(faces_dir / "biden_1.jpg") as im:
        face = im.convert("RGB")
    face.thumbnail((96, 96))
    grey16 = Image.fromarray(np.asarray(face.convert("L"), np.uint16) * 257)
    frames = [face.rotate(angle) for angle in (8, 16)]
    return {
        "jpeg": _encode(face, "JPEG", quality=85),
        "jpeg_progressive": _encode(face, "JPEG", quality=85, progressive=True),
        "jpeg_cmyk": _encode(face.convert("CMYK"), "JPEG", quality=85),
        "png_rgb": _encode(face, "PNG"),
        "png_interlaced": _encode(face, "PNG", interlace=1) if _adam7_supported() else
        _encode(face, "PNG"),
        "png_palette": _encode(face.convert("P"), "PNG"),
        "png_grey16": _encode(grey16, "PNG"),
        "png_rgba": _encode(face.convert("RGBA"), "PNG"),
        "webp_lossy": _encode(face, "WEBP", quality=85),
        "webp_lossless": _encode(face, "WEBP", lossless=True),
        "webp_exif": _encode(face, "WEBP", quality=85, exif=_orientation_exif(6)),
        # Animated files are refused (which frame holds the face?), but only after their
        # header is parsed: the damage must reach that parser too.
        "webp_animated": _encode(face, "WEBP", quality=85, save_all=True,
                                 append_images=frames),
        "avif": _encode(face, "AVIF", quality=85),
        "avif_grey": _encode(face.convert("L"), "AVIF", quality=85),
        "avif_animated": _encode(face, "AVIF", quality=85, save_all=True,
                                 append_images=frames),
        "heic": _encode(face, "HEIF", quality=85),
        "heic_grey10": _encode(grey16, "HEIF", quality=-1),
        "heic_rotated": _encode(face, "HEIF", quality=85, exif=_orientation_exif(6)),
        "jp2": _encode(face, "JPEG2000", quality_mode="rates", quality_layers=[15],
                       irreversible=True),
        "j2k": _encode(face, "JPEG2000", no_jp2=True),
        "j2k_tiled": _encode(face, "JPEG2000", no_jp2=True, tile_size=(32, 32),
                             quality_mode="rates", quality_layers=[30, 10]),
        "j2k_grey": _encode(face.convert("L"), "JPEG2000", no_jp2=True),
    }


def _documents(bases: dict[str, bytes]) -> dict[str, bytes]:
    """DG2s around the JPEG and JPEG 2000 bases, as a passport chip holds a portrait."""
    w, h = Image.open(io.BytesIO(bases["jpeg"])).size
    return {"dg2_jpeg": dg2(facial_record(bases["jpeg"], JPEG, w, h)),
            "dg2_j2k": dg2(facial_record(bases["j2k"], JPEG2000, w, h)),
            "dg2_jp2": dg2(facial_record(bases["jp2"], JPEG2000, w, h))}


def _orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _adam7_supported() -> bool:
    try:
        _encode(Image.new("RGB", (8, 8)), "PNG", interlace=1)
        return True
    except (OSError, ValueError, TypeError):
        return False


def _decoder(data: bytes) -> str:
    """The decoder the service hands these bytes to (sniffed as it sniffs), or "none";
    "DG2" for a passport data group (its portrait then goes to its own decoder)."""
    if is_document(data):
        return "DG2"
    try:
        return sniff_format(data)
    except UnsupportedImage:
        return "none"


def _decode_outcome(data: bytes, tally) -> str:
    """'ok' or the refusal's class name; fails the test on any other exception. Counts the
    case by decoder and outcome in the tally."""
    decoder = _decoder(data)
    try:
        out = decode_image(data)
    except InvalidInput as exc:
        assert str(exc), "a refusal must say why"
        tally.outcome("fuzz.decode", decoder, type(exc).__name__)
        return type(exc).__name__
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous
    h, w = out.shape[:2]
    assert h * w <= DEFAULT_LIMITS.max_pixels and max(h, w) <= DEFAULT_LIMITS.max_side
    tally.outcome("fuzz.decode", decoder, "ok")
    return "ok"


def _fuzz_settings(budget, name: str):
    return settings(max_examples=budget.fuzz(name), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _run_mutations(bases, budget, tally, case: str, prefixes: str | tuple[str, ...],
                   mutate: Callable[[bytes, st.DataObject], bytes]) -> None:
    """Fuzz ``mutate`` over the bases whose names start with ``prefixes``: each mutated file
    is decoded and counted by outcome (budget and tally under ``decode.<case>``). The
    mutations must reach both a decode and a refusal, or they never got past the header
    checks (or never hit them)."""
    names = sorted(k for k in bases if k.startswith(prefixes))
    counts: Counter[str] = Counter()

    @_fuzz_settings(budget, f"decode.{case}")
    @given(base=st.sampled_from(names), data=st.data())
    def run(base: str, data: st.DataObject) -> None:
        counts[_decode_outcome(mutate(bases[base], data), tally)] += 1
        tally.add(f"fuzz.decode.{case}")

    run()
    assert len(counts) >= 2, f"the mutations never reached both outcomes: {dict(counts)}"


def test_bases_cover_every_decoder_the_service_accepts(bases, tally):
    """The mutation bases reach every decoder decode_image accepts, stills decode, and the
    animated WebP and AVIF are refused from their header."""
    from matcher.face.decode import ACCEPTED_FORMATS

    assert {_decoder(data) for data in bases.values()} == set(ACCEPTED_FORMATS)
    for name, data in {**bases, **_documents(bases)}.items():
        expected = "UnsupportedImage" if name.endswith("_animated") else "ok"
        assert _decode_outcome(data, tally) == expected, name


def test_png_chunk_mutations(bases, budget, tally):
    """Mutate PNG chunks with valid CRCs: IHDR fields, IDAT bytes, chunk order and count."""
    def mutate(base: bytes, data: st.DataObject) -> bytes:
        chunks = _png_chunks(base)
        op = data.draw(st.sampled_from(["ihdr", "idat_flip", "drop", "duplicate", "swap",
                                        "idat_trunc", "plte", "inject"]))
        i = data.draw(st.integers(0, len(chunks) - 1))
        ctype, payload = chunks[i]
        if op == "ihdr":
            w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
            field = data.draw(st.integers(0, 6))
            values = [w, h, depth, colour, comp, filt, interlace]
            values[field] = data.draw(st.integers(0, 2**31 - 1) if field < 2
                                      else st.integers(0, 255))
            chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", *values))
        elif op == "idat_flip":
            idats = [j for j, c in enumerate(chunks) if c[0] == b"IDAT"]
            j = data.draw(st.sampled_from(idats))
            raw = bytearray(chunks[j][1])
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            chunks[j] = (b"IDAT", bytes(raw))
        elif op == "idat_trunc":
            idats = [j for j, c in enumerate(chunks) if c[0] == b"IDAT"]
            j = data.draw(st.sampled_from(idats))
            chunks[j] = (b"IDAT", chunks[j][1][:data.draw(st.integers(0, len(chunks[j][1])))])
        elif op == "drop":
            del chunks[i]
        elif op == "duplicate":
            chunks.insert(i, (ctype, payload))
        elif op == "swap":
            j = data.draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "plte":
            chunks.insert(1, (b"PLTE", data.draw(st.binary(max_size=800))))
        else:  # a foreign or ancillary chunk with random contents
            kind = data.draw(st.sampled_from([b"tEXt", b"zTXt", b"iCCP", b"eXIf", b"acTL",
                                              b"fcTL", b"sBIT", b"gAMA", b"xYzW"]))
            chunks.insert(max(1, i), (kind, data.draw(st.binary(max_size=300))))
        return _png_build(chunks)

    _run_mutations(bases, budget, tally, "png_chunks", "png", mutate)


def test_jpeg_marker_mutations(bases, budget, tally):
    """Change JPEG frame dimensions and component counts, damage tables and scan data."""
    jpegs = sorted(k for k in bases if k.startswith("jpeg"))

    @_fuzz_settings(budget, "decode.jpeg_markers")
    @given(base=st.sampled_from(jpegs), data=st.data())
    def run(base: str, data: st.DataObject) -> None:
        raw = bytearray(bases[base])
        sof = max(raw.find(b"\xff\xc0"), raw.find(b"\xff\xc2"))
        op = data.draw(st.sampled_from(["dims", "components", "tables", "scan", "cut_marker"]))
        if op == "dims" and sof > 0:
            h = data.draw(st.integers(0, 65535))
            w = data.draw(st.integers(0, 65535))
            raw[sof + 5:sof + 9] = struct.pack(">HH", h, w)
        elif op == "components" and sof > 0:
            raw[sof + 9] = data.draw(st.integers(0, 255))
        elif op == "tables":  # anywhere in the headers: quantisation, Huffman, frame
            sos = raw.find(b"\xff\xda")
            for _ in range(data.draw(st.integers(1, 6))):
                raw[data.draw(st.integers(2, sos - 1))] = data.draw(st.integers(0, 255))
        elif op == "scan":
            sos = raw.find(b"\xff\xda")
            for _ in range(data.draw(st.integers(1, 16))):
                pos = data.draw(st.integers(sos + 2, len(raw) - 3))
                raw[pos] = data.draw(st.integers(0, 255))
        else:
            markers = [j for j in range(len(raw) - 1) if raw[j] == 0xFF and raw[j + 1] not in
                       (0x00, 0xFF)]
            raw = raw[:data.draw(st.sampled_from(markers)) + data.draw(st.integers(0, 3))]
        _decode_outcome(bytes(raw), tally)
        tally.add("fuzz.decode.jpeg_markers")

    run()


def test_header_bombs_are_refused_from_the_header(bases, budget, tally):
    """Small real files declaring more pixels than allowed: ImageTooLarge, no decode."""
    slowest = [0.0]

    @_fuzz_settings(budget, "decode.bombs")
    @given(fmt=st.sampled_from(["png", "jpeg", "webp", "heic", "avif", "j2k", "jp2"]),
           width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
    def run(fmt: str, width: int, height: int) -> None:
        if fmt == "jpeg":
            width, height = min(width, 65535), min(height, 65535)
        elif fmt == "webp":  # VP8X stores width-1 and height-1 in 24 bits each
            width, height = min(width, 2**24), min(height, 2**24)
        too_large = (width * height > DEFAULT_LIMITS.max_pixels
                     or max(width, height) > DEFAULT_LIMITS.max_side)
        # In-limit sizes are covered by the mutation tests. assume(), not return: a skipped
        # draw must not count as a case (Hypothesis draws again until max_examples ran).
        assume(too_large)
        data = {"png": _png_bomb, "jpeg": _jpeg_bomb,
                "webp": lambda w, h: webp_bomb(bases["webp_lossy"], w, h),
                "heic": lambda w, h: ispe_bomb(bases["heic"], w, h),
                "avif": lambda w, h: ispe_bomb(bases["avif"], w, h),
                "j2k": lambda w, h: j2k_bomb(bases["j2k"], w, h),
                "jp2": lambda w, h: j2k_bomb(bases["jp2"], w, h)}[fmt](width, height)
        start = time.monotonic()
        with pytest.raises(ImageTooLarge):
            decode_image(data)
        slowest[0] = max(slowest[0], time.monotonic() - start)
        tally.outcome("fuzz.decode", _decoder(data), "ImageTooLarge")
        tally.add("fuzz.decode.bombs")

    run()
    tally.figure("fuzz.decode.bomb_refusal_slowest_ms", round(1e3 * slowest[0], 2))
    if budget.soak:
        assert slowest[0] < BOMB_REFUSAL_BOUND_S, f"a bomb took {slowest[0]:.3f} s to refuse"


def _png_bomb(width: int, height: int) -> bytes:
    # A real compressed row stream that would inflate to width*height*3 bytes, cut short.
    idat = zlib.compressobj(9).compress(b"\x00" * 65536)
    return _png_build([(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                       (b"IDAT", idat), (b"IEND", b"")])


_SMALL_JPEG = _encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG")


def _jpeg_bomb(width: int, height: int) -> bytes:
    raw = bytearray(_SMALL_JPEG)
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def _boxes(data: bytes, start: int, end: int) -> list[tuple[int, int, bytes]]:
    """(offset, size, type) of the ISO-BMFF boxes in data[start:end], one level."""
    out, pos = [], start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size < 8 or pos + size > end:
            break
        out.append((pos, size, kind))
        pos += size
    return out


def _all_boxes(data: bytes) -> list[tuple[int, int, bytes]]:
    """Every box down the meta/iprp/ipco/iinf/iref/dinf path, plus the top level."""
    found, todo = [], [(0, len(data))]
    while todo:
        start, end = todo.pop()
        for pos, size, kind in _boxes(data, start, end):
            found.append((pos, size, kind))
            if kind == b"meta":
                todo.append((pos + 12, pos + size))
            elif kind in (b"iprp", b"ipco", b"dinf"):
                todo.append((pos + 8, pos + size))
    return sorted(found)


def test_heif_and_avif_box_mutations(bases, budget, tally):
    """Damage HEIC/AVIF boxes: sizes, ispe/pixi/irot contents, item tables, coded data."""
    def mutate(base: bytes, data: st.DataObject) -> bytes:
        raw = bytearray(base)
        boxes = _all_boxes(bytes(raw))
        pos, size, kind = data.draw(st.sampled_from(boxes))
        op = data.draw(st.sampled_from(["size", "contents", "ispe", "mdat", "cut", "drop"]))
        if op == "size":
            raw[pos:pos + 4] = struct.pack(">I", data.draw(st.sampled_from(
                [0, 1, 7, 8, size - 1, size + 1, size * 2, 2**32 - 1])) % 2**32)
        elif op == "contents" and size > 8:
            for _ in range(data.draw(st.integers(1, 6))):
                raw[data.draw(st.integers(pos + 8, pos + size - 1))] = data.draw(
                    st.integers(0, 255))
        elif op == "ispe":
            raw = bytearray(ispe_bomb(bytes(raw), data.draw(st.integers(0, 12_000)),
                                      data.draw(st.integers(0, 12_000))))
        elif op == "mdat":
            mdat = raw.find(b"mdat")
            for _ in range(data.draw(st.integers(1, 16))):
                raw[data.draw(st.integers(mdat + 4, len(raw) - 1))] = data.draw(
                    st.integers(0, 255))
        elif op == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            del raw[pos:pos + size]
        return bytes(raw)

    _run_mutations(bases, budget, tally, "isobmff_boxes", ("heic", "avif"), mutate)


def test_webp_chunk_mutations(bases, budget, tally):
    """Damage WebP RIFF chunks: sizes, the VP8X canvas and flags, the coded frame."""
    def mutate(base: bytes, data: st.DataObject) -> bytes:
        raw = bytearray(base)
        op = data.draw(st.sampled_from(["riff_size", "chunk_size", "canvas", "flags",
                                        "frame", "cut", "anim"]))
        if op == "riff_size":
            raw[4:8] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
        elif op == "chunk_size":
            raw[16:20] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
        elif op == "canvas":
            raw = bytearray(webp_bomb(bytes(raw), data.draw(st.integers(1, 12_000)),
                                      data.draw(st.integers(1, 12_000))))
        elif op == "flags" and raw[12:16] == b"VP8X":
            raw[20] = data.draw(st.integers(0, 255))
        elif op == "frame":
            for _ in range(data.draw(st.integers(1, 16))):
                raw[data.draw(st.integers(20, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:  # an ANIM/ANMF pair claiming the still is an animation
            anim = b"ANIM" + struct.pack("<I", 6) + bytes(6)
            raw[12:12] = anim
            raw[4:8] = struct.pack("<I", len(raw) - 8)
        return bytes(raw)

    _run_mutations(bases, budget, tally, "webp_chunks", "webp", mutate)


def _segments(raw: bytes, start: int) -> list[tuple[int, int]]:
    """(offset, total length) of each marker segment of a J2K main header, from SIZ."""
    out, pos = [], start
    while pos + 4 <= len(raw) and raw[pos] == 0xFF and raw[pos + 1] != 0x90:
        (n,) = struct.unpack(">H", raw[pos + 2:pos + 4])
        out.append((pos, 2 + n))
        pos += 2 + n
    return out


def test_jpeg2000_marker_mutations(bases, budget, tally):
    """Damage JPEG 2000 headers where they size memory: SIZ (canvas, origin, tile grid,
    components, depth, subsampling), COD (levels, layers, code blocks), JP2 boxes, tile
    parts and coded data; cut anywhere."""
    def mutate(base: bytes, data: st.DataObject) -> bytes:
        raw = bytearray(base)
        soc = raw.find(b"\xff\x4f\xff\x51")
        siz = soc + 2
        op = data.draw(st.sampled_from(["siz_field", "components", "cod", "segment_length",
                                        "box_length", "tile_part", "data", "cut"]))
        if op == "siz_field":   # one 32-bit field of Xsiz .. YTOsiz
            field = data.draw(st.integers(0, 7))
            value = data.draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 4096)))
            raw[siz + 6 + 4 * field:siz + 10 + 4 * field] = struct.pack(">I", value)
        elif op == "components":
            pos = data.draw(st.integers(siz + 38, siz + 40 + 3 * 3))
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cod":
            cod = raw.find(b"\xff\x52")
            pos = data.draw(st.integers(cod + 4, cod + 13))
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "segment_length":
            pos, _ = data.draw(st.sampled_from(_segments(bytes(raw), siz)))
            raw[pos + 2:pos + 4] = struct.pack(">H", data.draw(st.integers(0, 65535)))
        elif op == "box_length" and soc > 0:   # a JP2: one of its box lengths
            pos = data.draw(st.sampled_from([0, 12, 32, soc - 8]))
            raw[pos:pos + 4] = struct.pack(">I", data.draw(st.sampled_from(
                [0, 1, 7, 8, 2**31, 2**32 - 1, len(raw)])))
        elif op == "tile_part":
            sot = raw.find(b"\xff\x90")
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(sot + 2, sot + 11))] = data.draw(st.integers(0, 255))
        elif op == "data":
            sod = raw.find(b"\xff\x93")
            for _ in range(data.draw(st.integers(1, 16))):
                raw[data.draw(st.integers(sod + 2, len(raw) - 1))] = data.draw(
                    st.integers(0, 255))
        else:
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        return bytes(raw)

    _run_mutations(bases, budget, tally, "j2k_markers", ("jp2", "j2k"), mutate)


def test_document_mutations(bases, budget, tally):
    """Damage passport DG2s: TLV tags and lengths (up to 2**32), the 19794-5 record's
    lengths, counts and declared size, the image type, the portrait's own bytes."""
    documents = _documents(bases)

    def mutate(name: str, data: st.DataObject) -> bytes:
        raw = bytearray(documents[name])
        record = raw.find(b"FAC\x00")
        op = data.draw(st.sampled_from(["tlv_byte", "length_field", "record_field",
                                        "image_info", "image", "cut", "nest"]))
        if op == "tlv_byte":    # anywhere in the TLV headers before the record
            raw[data.draw(st.integers(0, record - 1))] = data.draw(st.integers(0, 255))
        elif op == "length_field":
            pos = data.draw(st.integers(1, record - 1))
            raw[pos:pos + 1] = data.draw(st.sampled_from(
                [b"\x80", b"\x84\xff\xff\xff\xff", b"\x85\x01\x00\x00\x00\x00",
                 b"\x82\xff\xff", b"\x00"]))
        elif op == "record_field":   # record length, face count, face length, point count
            pos = data.draw(st.sampled_from([record + 8, record + 12, record + 14,
                                             record + 18]))
            width = 2 if pos in (record + 12, record + 18) else 4
            raw[pos:pos + width] = data.draw(st.integers(0, 2**(8 * width) - 1)).to_bytes(
                width, "big")
        elif op == "image_info":     # image data type, width, height
            info = record + 14 + 20
            pos = data.draw(st.integers(info, info + 5))
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "image":
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(record + 46, len(raw) - 1))] = data.draw(
                    st.integers(0, 255))
        elif op == "cut":
            raw = raw[:data.draw(st.integers(1, len(raw) - 1))]
        else:   # the group template wrapped again and again
            depth = data.draw(st.integers(1, 64))
            inner = bytes(raw[2:]) if raw[1] < 0x80 else bytes(raw[2 + (raw[1] & 0x7F):])
            for _ in range(depth):
                inner = b"\x7f\x61" + _ber_length(len(inner)) + inner
            raw = bytearray(b"\x75" + _ber_length(len(inner)) + inner)
        return bytes(raw)

    names = sorted(documents)
    counts: Counter[str] = Counter()

    @_fuzz_settings(budget, "decode.documents")
    @given(name=st.sampled_from(names), data=st.data())
    def run(name: str, data: st.DataObject) -> None:
        counts[_decode_outcome(mutate(name, data), tally)] += 1
        tally.add("fuzz.decode.documents")

    run()
    assert len(counts) >= 2, f"the mutations never reached both outcomes: {dict(counts)}"


def _ber_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def test_random_bytes_behind_real_magic_numbers(budget, tally):
    """Random bodies after PNG/JPEG/GIF/TIFF/WebP signatures and zero-size inputs."""
    magics = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a",
              b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP", b"BM", b"\x00\x00\x01\x00",
              b"RIFF\x00\x10\x00\x00WEBPVP8X", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00",
              b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", b"\x00\x00\x00\x18ftypmif1",
              b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00", b"\x00\x00\x00\x18ftypheix",
              b"RIFF\x00\x10\x00\x00WEBPVP8X\x0a\x00\x00\x00\x02\x00\x00\x00ANIM",
              b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51", b"\x75", b"\x75\x82",
              b"\x75\x82\x01\x00\x7f\x61", b"FAC\x00010\x00"]

    @_fuzz_settings(budget, "decode.magic_random")
    @given(magic=st.sampled_from(magics), body=st.binary(max_size=2048))
    def run(magic: bytes, body: bytes) -> None:
        _decode_outcome(magic + body, tally)
        tally.add("fuzz.decode.magic_random")

    run()


@pytest.mark.parametrize("kind", ["gif_animated", "tiff_multipage", "webp_animated", "apng",
                                  "avif_animated", "bmp"])
def test_other_containers_are_refused_as_unsupported(kind: str, tally) -> None:
    frames = [Image.new("RGB", (64, 64), (i * 40, 80, 120)) for i in range(3)]
    fmt = {"gif_animated": "GIF", "tiff_multipage": "TIFF", "webp_animated": "WEBP",
           "apng": "PNG", "avif_animated": "AVIF", "bmp": "BMP"}[kind]
    try:
        data = (_encode(frames[0], fmt) if fmt == "BMP" else
                _encode(frames[0], fmt, save_all=True, append_images=frames[1:]))
    except (OSError, KeyError, ValueError) as exc:
        pytest.skip(f"this Pillow cannot write {fmt}: {exc}")
    assert _decode_outcome(data, tally) in ("UnsupportedImage", "CorruptImage")
    tally.add("fuzz.decode.containers")
