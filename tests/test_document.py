"""Passport chip portraits: DG2 parsing (matcher.face.document) and JPEG 2000 decoding.

Documents are written here by tests/dg2_writer.py around the committed test photos, as an
issuer writes them (JPEG and JPEG 2000, JP2 and raw codestream); the hostile ones are
built from the same pieces. Every refusal must be a DocumentUnreadable (an InvalidInput,
INVALID_ARGUMENT at the service) naming its reason.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from dg2_writer import (
    ICAO_PORTRAIT,
    JPEG,
    JPEG2000,
    chip_jpeg2000,
    dg2,
    encode,
    facial_record,
    feature_point,
    portrait_dg2,
    tlv,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from image_bombs import j2k_bomb

from matcher.errors import CorruptImage, DocumentUnreadable, ImageTooLarge, InvalidInput
from matcher.face import jpeg2000
from matcher.face.decode import decode_image, decode_reduced
from matcher.face.document import is_document, read_portrait


def _gradient(h: int = 96, w: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)],
                    axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def portrait(faces_dir: Path) -> np.ndarray:
    """A real face photo cut and scaled to ICAO's 413 x 531 portrait."""
    pixels = decode_image((faces_dir / "obama_4.jpg").read_bytes())
    from PIL import Image

    h, w = pixels.shape[:2]
    crop_w = min(w, h * ICAO_PORTRAIT[0] // ICAO_PORTRAIT[1])
    left = (w - crop_w) // 2
    image = Image.fromarray(pixels[:, left:left + crop_w]).resize(ICAO_PORTRAIT,
                                                                  Image.Resampling.LANCZOS)
    return np.asarray(image)


# -- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("data_type,codestream", [(JPEG, False), (JPEG2000, True),
                                                  (JPEG2000, False)])
def test_dg2_round_trips(portrait, data_type: int, codestream: bool) -> None:
    data = portrait_dg2(portrait, data_type, target_bytes=18_000, codestream=codestream)
    assert is_document(data)
    found = read_portrait(data)
    assert found.image_type == ("JPEG" if data_type == JPEG else "JPEG 2000")
    assert found.declared_size == ICAO_PORTRAIT and found.faces_in_record == 1
    out = decode_image(data)
    assert out.shape == (531, 413, 3)
    assert np.abs(out.astype(int) - portrait).mean() < 8   # lossy, the same picture


def test_feature_points_a_second_face_and_constructed_block_are_read(portrait) -> None:
    image = encode(portrait, "JPEG", quality=90)
    eyes = (feature_point(1, 0xC1, 150, 220), feature_point(1, 0xC2, 260, 220))
    record = facial_record(image, JPEG, *ICAO_PORTRAIT, points=eyes)
    # a second face image appended to the record: the first is the portrait
    second = record[14:]
    two = (record[:8] + struct.pack(">IH", len(record) + len(second), 2) + record[14:]
           + second)
    for data in (dg2(record), dg2(two), dg2(record, bdb_tag=0x7F2E),
                 dg2(record, instances=2), record):
        found = read_portrait(data)
        assert found.image == image


def test_jpeg2000_decodes_to_the_pixels_it_holds() -> None:
    pixels = _gradient(203, 157)
    for codestream in (True, False):
        data = encode(pixels, "JPEG2000", no_jp2=codestream)   # lossless 5/3
        np.testing.assert_array_equal(decode_image(data), pixels)


def test_jpeg2000_template_equals_the_png_of_the_same_pixels(portrait, pipeline) -> None:
    """The issue's parity target: cosine >= 0.999 to the same pixels sent as PNG."""
    (png,) = pipeline.analyse_bytes(encode(portrait, "PNG"))
    for data in (encode(portrait, "JPEG2000", no_jp2=True), encode(portrait, "JPEG2000"),
                 dg2(facial_record(encode(portrait, "JPEG2000"), JPEG2000, *ICAO_PORTRAIT))):
        (face,) = pipeline.analyse_bytes(data)
        assert float(face.template @ png.template) >= 0.999


def test_chip_compressed_portrait_stays_the_same_face(portrait, pipeline) -> None:
    """At a chip's 15-20 KB the template moves, but stays far above any threshold."""
    (png,) = pipeline.analyse_bytes(encode(portrait, "PNG"))
    chip = chip_jpeg2000(portrait, 18_000, codestream=True)
    assert 12_000 < len(chip) < 20_000
    (face,) = pipeline.analyse_bytes(dg2(facial_record(chip, JPEG2000, *ICAO_PORTRAIT)))
    assert float(face.template @ png.template) >= 0.9


# -- JPEG 2000 headers ----------------------------------------------------------------

def test_jpeg2000_header_fields(portrait) -> None:
    header = jpeg2000.read_header(encode(portrait, "JPEG2000", tile_size=(128, 128),
                                         num_resolutions=4))
    assert header.size == ICAO_PORTRAIT and header.components == 3
    assert header.tiles == 4 * 5 and header.levels == 3 and header.bit_depth == 8


@pytest.mark.parametrize("codestream", [True, False])
@pytest.mark.parametrize("size,tile,match", [
    ((32_768, 32_768), None, "32768x32768 pixels"),          # 2**30 pixels
    ((12_001, 64), None, "per side"),
    ((4_000, 4_000), (16, 16), "62500 tiles"),                # 16 MP cut into tiny tiles
])
def test_jpeg2000_bombs_are_refused_from_the_header(codestream, size, tile, match) -> None:
    small = encode(_gradient(64, 64), "JPEG2000", no_jp2=codestream)
    with pytest.raises(ImageTooLarge, match=match):
        decode_image(j2k_bomb(small, *size, tile=tile))


def test_jp2_whose_header_box_and_codestream_disagree_is_corrupt() -> None:
    data = bytearray(encode(_gradient(64, 64), "JPEG2000"))
    ihdr = data.find(b"ihdr")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 60, 64)
    with pytest.raises(CorruptImage, match="64x60 pixels but its codestream 64x64"):
        decode_image(bytes(data))


def test_jpeg2000_levels_and_layers_over_the_limits_are_refused() -> None:
    data = bytearray(encode(_gradient(64, 64), "JPEG2000", no_jp2=True))
    cod = data.find(b"\xff\x52")
    levels = bytes(data)
    data[cod + 9] = 30                       # SPcod: decomposition levels
    with pytest.raises(ImageTooLarge, match="30 decomposition levels"):
        decode_image(bytes(data))
    data = bytearray(levels)
    data[cod + 6:cod + 8] = struct.pack(">H", 65_535)   # SGcod: quality layers
    with pytest.raises(ImageTooLarge, match="65535 quality layers"):
        decode_image(bytes(data))


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.9])
def test_truncated_jpeg2000_is_refused(keep: float) -> None:
    noise = np.random.default_rng(4).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    for codestream in (True, False):
        data = encode(noise, "JPEG2000", no_jp2=codestream)
        with pytest.raises(InvalidInput):
            decode_image(data[: int(len(data) * keep)])


def _blob_centroid(pixels: np.ndarray) -> tuple[float, float]:
    weight = pixels[..., 0].astype(np.float64) - 20
    weight[weight < 5] = 0
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


def test_reduced_jpeg2000_maps_back_onto_the_full_decode() -> None:
    """A bright blob off the pixel grid lands where the full decode has it at every
    reduction (the low-pass samples sit on even pixels: offset -(r - 1) / 2). A smooth
    blob, because a hard-edged square rings differently at each level."""
    y, x = np.mgrid[0:800, 0:1000]
    blob = 20 + 200 * np.exp(-((x - 401.3) ** 2 + (y - 222.8) ** 2) / (2 * 6.0 ** 2))
    data = encode(np.repeat(blob[:, :, None], 3, axis=2).astype(np.uint8), "JPEG2000",
                  no_jp2=True)
    fx, fy = _blob_centroid(decode_image(data))
    for reduction in (2, 4, 8):
        reduced = decode_reduced(data, max_reduction=reduction)
        assert reduced.reduction == reduction
        assert reduced.pixels.shape[:2] == (800 // reduction, 1000 // reduction)
        rx, ry = _blob_centroid(reduced.pixels)
        half = (reduction - 1) / 2
        assert reduction * rx + half + reduced.offset[0] == pytest.approx(fx, abs=0.3)
        assert reduction * ry + half + reduced.offset[1] == pytest.approx(fy, abs=0.3)


def test_jpeg2000_reductions_pillow_would_size_wrongly_are_not_used() -> None:
    """413 / 4 rounds to 103 in Pillow and 104 in OpenJPEG: a reduction of 4 would fail."""
    data = encode(_gradient(531, 413), "JPEG2000", no_jp2=True)
    assert decode_reduced(data, max_reduction=8).reduction == 2
    data = encode(_gradient(531, 413), "JPEG2000", no_jp2=True, num_resolutions=1)
    assert decode_reduced(data, max_reduction=8).reduction == 1   # no levels to reduce to


# -- hostile documents ------------------------------------------------------------------

def _small_record(image_type: int = JPEG) -> bytes:
    pixels = _gradient(64, 64)
    image = encode(pixels, "JPEG") if image_type == JPEG else encode(pixels, "JPEG2000",
                                                                      no_jp2=True)
    return facial_record(image, image_type, 64, 64)


def hostile_documents() -> dict[str, bytes]:
    """name -> a document every reader must refuse (tests/test_service_document.py sends
    the same ones to a real server)."""
    record = _small_record()
    good = dg2(record)
    j2k = encode(_gradient(64, 64), "JPEG2000", no_jp2=True)
    nested = tlv(0x02, b"\x01")
    for _ in range(2_000):
        nested = tlv(0x7F61, nested)
    return {
        "truncated": good[: len(good) // 2],
        "truncated_in_header": good[:9],
        "length_past_end": b"\x75\x82\x10\x00" + good[2:],
        "length_2_32": b"\x75\x85\x01\x00\x00\x00\x00" + good[2:],
        "length_2_32_minus_1": b"\x75\x84\xff\xff\xff\xff" + good[2:],
        "deeply_nested": tlv(0x75, nested),
        "record_65535_square": dg2(facial_record(encode(_gradient(64, 64), "JPEG"), JPEG,
                                                 65_535, 65_535)),
        "j2k_2_30_pixels": dg2(facial_record(j2k_bomb(j2k, 32_768, 32_768), JPEG2000,
                                             413, 531)),
        "jpeg2000_in_jpeg_record": dg2(facial_record(j2k, JPEG, 64, 64)),
        "record_longer_than_block": dg2(facial_record(encode(_gradient(64, 64), "JPEG"),
                                                      JPEG, 64, 64, record_length=2**32 - 1)),
        "face_longer_than_record": dg2(facial_record(encode(_gradient(64, 64), "JPEG"),
                                                     JPEG, 64, 64, face_length=2**31)),
        "instance_count_lies": dg2(record, instances=1).replace(b"\x02\x01\x01", b"\x02\x01\x03",
                                                                1),
        "iso39794": dg2(tlv(0xA1, tlv(0x80, b"\x01") + tlv(0xA2, b"\x00" * 32))),
        "not_a_face": dg2(record, format_type=0x0009),
        "no_image": dg2(facial_record(b"", JPEG, 64, 64)),
        "indefinite_length": b"\x75\x80" + good[2:],
    }


_REASONS = {
    "truncated": "length_past_end", "truncated_in_header": "length_past_end",
    "length_past_end": "length_past_end", "length_2_32": "bad_length",
    "length_2_32_minus_1": "length_past_end", "deeply_nested": "too_deep",
    "record_65535_square": "declared_too_large", "j2k_2_30_pixels": "image",
    "jpeg2000_in_jpeg_record": "image_type_mismatch",
    "record_longer_than_block": "length_past_end", "face_longer_than_record": "length_past_end",
    "instance_count_lies": "instance_count", "iso39794": "iso39794_unsupported",
    "not_a_face": "not_a_face_record", "no_image": "no_image",
    "indefinite_length": "bad_length",
}


@pytest.mark.parametrize("name", sorted(_REASONS))
def test_hostile_documents_are_refused_with_their_reason(name: str) -> None:
    data = hostile_documents()[name]
    with pytest.raises(DocumentUnreadable) as refused:
        decode_image(data)
    assert refused.value.reason == _REASONS[name], str(refused.value)
    assert str(refused.value).startswith(f"document_unreadable:{_REASONS[name]} (")


def test_the_2_30_pixel_portrait_names_the_image_limit() -> None:
    with pytest.raises(DocumentUnreadable, match="32768x32768 pixels"):
        decode_image(hostile_documents()["j2k_2_30_pixels"])


@settings(max_examples=300, deadline=None, database=None)
@given(doc=st.sampled_from(["jpeg", "j2k"]),
       flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=6),
       cut=st.integers(1, 100_000))
def test_damaged_documents_never_escape_as_other_errors(doc: str, flips, cut: int) -> None:
    """Damage anywhere in a document (its TLVs, the record, the image): decoded or refused
    as InvalidInput, nothing else."""
    base = _FUZZ_DOCS[doc]
    data = bytearray(base)
    for pos, value in flips:
        data[pos % 200 if pos % 2 else pos % len(data)] = value  # the headers, often
    data = data[: max(1, cut % (len(data) + 1))]
    try:
        out = decode_image(bytes(data))
    except InvalidInput:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


_FUZZ_DOCS = {"jpeg": dg2(_small_record(JPEG)), "j2k": dg2(_small_record(JPEG2000))}
