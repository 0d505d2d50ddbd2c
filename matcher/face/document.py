"""The portrait of a passport chip: ICAO Doc 9303 part 10 data group 2 (DG2), read safely.

DG2 is BER-TLV (ICAO 9303-10, 4.7.2; the CBEFF patron format of ISO/IEC 19785-3):

    75          DG2
      7F61      biometric information group template
        02      number of instances (1 byte)
        7F60    biometric information template, one per instance
          A1    biometric header template: 87 format owner (0101: ISO/IEC JTC 1
                SC 37), 88 format type (0008: face image), and optional fields
          5F2E  biometric data block (7F2E where the issuer marked it constructed)

The data block holds an ISO/IEC 19794-5:2005 facial record: a 14-byte general header
(``FAC\\0``, version ``010\\0``, record length, number of faces), then per face a 20-byte
facial information block (its length, feature point count, gender, eyes, hair, feature
mask, expression, pose), 8 bytes per feature point, a 12-byte image information block
(face image type, image data type 0 JPEG / 1 JPEG 2000, width, height, colour space,
source, device, quality) and the image itself.

Every length is checked against the bytes left before anything is read through it;
indefinite and over-long length fields, nesting deeper than the structure has and more
elements than a DG2 holds are refused. The record's own width and height are never used
to size anything: the image's header is what the decoder checks, and a record declaring
more pixels than any photo may have is refused outright. Anything unreadable raises
DocumentUnreadable with a reason code (``document_unreadable:<why>``).

The newer ISO/IEC 39794-5 encoding (an ASN.1 tagged record instead of ``FAC``) is
recognised and refused with its own reason: no chip this service has met writes it, and
no test document of it exists here to hold a parser to.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import DocumentUnreadable

DG2_TAG = 0x75
# A DG2 nests four deep (75 / 7F61 / 7F60 / A1); a few levels spare for issuers' extras.
MAX_DEPTH = 6
# Elements in a whole DG2: a few per instance; a flood of tiny ones is refused instead of
# parsed one by one.
MAX_ELEMENTS = 256
FACE_RECORD_MAGIC = b"FAC\x00"
FACE_RECORD_VERSION = b"010\x00"        # ISO/IEC 19794-5:2005, what ICAO 9303 prescribes
GENERAL_HEADER_BYTES = 14
FACIAL_INFORMATION_BYTES = 20
FEATURE_POINT_BYTES = 8
IMAGE_INFORMATION_BYTES = 12
FORMAT_OWNER_SC37 = 0x0101
FORMAT_TYPE_FACE = 0x0008
IMAGE_DATA_TYPES = {0: "JPEG", 1: "JPEG 2000"}
# No photo may have a side longer than this (DecodeLimits.max_side); a record claiming
# more is refused before its image is looked at.
MAX_DECLARED_SIDE = 12_000

_BIT_GROUP, _BIT, _BHT, _INSTANCES = 0x7F61, 0x7F60, 0xA1, 0x02
_BDB_TAGS = (0x5F2E, 0x7F2E)
_FORMAT_OWNER, _FORMAT_TYPE = 0x87, 0x88


@dataclass(frozen=True)
class Portrait:
    """The first facial image of a document.

    image: the encoded image's bytes (JPEG, JP2 or a J2K codestream), as the chip holds
    them. image_type: "JPEG" or "JPEG 2000", what the record declares (checked against the
    image's own signature). declared_size: (width, height) the record declares; the
    decoder checks the image's own header, not this.
    """

    image: bytes
    image_type: str
    declared_size: tuple[int, int]
    faces_in_record: int


@dataclass(frozen=True)
class _Tlv:
    tag: int
    start: int   # first byte of the value
    end: int     # one past its last byte
    children: tuple[_Tlv, ...] = ()

    def find(self, tag: int) -> list[_Tlv]:
        return [c for c in self.children if c.tag == tag]


def is_document(data: bytes) -> bool:
    """True for bytes that are a DG2 (tag 75) or a bare 19794-5 facial record (``FAC``).

    No image format accepted by the decoder starts with either."""
    return data[:1] == bytes([DG2_TAG]) or data.startswith(FACE_RECORD_MAGIC)


def read_portrait(data: bytes) -> Portrait:
    """The first face image of a DG2, or of a bare 19794-5 facial record.

    Raises DocumentUnreadable, with a reason code, for anything it cannot read safely.
    """
    if data.startswith(FACE_RECORD_MAGIC):
        return _facial_record(data, 0, len(data))
    if data[:1] != bytes([DG2_TAG]):
        raise DocumentUnreadable("not_dg2", "the bytes are not an ICAO 9303 DG2 (tag 75)")
    counter = [0]
    root = _parse(data, 0, len(data), 0, counter, top=True)[0]
    if root.end != len(data):
        # trailing bytes after the DG2: a reader's padding is harmless, but they are not
        # part of the signed data group either, so say so rather than guess
        raise DocumentUnreadable("trailing_bytes", f"{len(data) - root.end} bytes follow the "
                                 "DG2; send the data group exactly as read from the chip")
    groups = root.find(_BIT_GROUP)
    if len(groups) != 1:
        raise DocumentUnreadable("no_biometric_group", "the DG2 must hold one biometric "
                                 f"information group template (7F61), found {len(groups)}")
    group = groups[0]
    counts = group.find(_INSTANCES)
    instances = group.find(_BIT)
    if len(counts) != 1 or counts[0].end - counts[0].start != 1:
        raise DocumentUnreadable("instance_count", "the biometric group must start with a "
                                 "one-byte instance count (tag 02)")
    declared = data[counts[0].start]
    if declared < 1 or declared != len(instances):
        raise DocumentUnreadable("instance_count", f"the group declares {declared} "
                                 f"instance(s) but holds {len(instances)}")
    return _instance(data, instances[0])


def _instance(data: bytes, bit: _Tlv) -> Portrait:
    headers = bit.find(_BHT)
    blocks = [c for c in bit.children if c.tag in _BDB_TAGS]
    if len(headers) != 1 or len(blocks) != 1:
        raise DocumentUnreadable("no_face_instance", "a biometric information template "
                                 "must hold one header (A1) and one data block (5F2E)")
    block = blocks[0]
    if not data.startswith(FACE_RECORD_MAGIC, block.start):
        _not_a_2005_record(data, block.start, block.end)
    owner = _field(data, headers[0], _FORMAT_OWNER)
    kind = _field(data, headers[0], _FORMAT_TYPE)
    if owner not in (None, FORMAT_OWNER_SC37) or kind not in (None, FORMAT_TYPE_FACE):
        raise DocumentUnreadable("not_a_face_record", "the biometric header names another "
                                 "format than an ISO/IEC 19794-5 face image (owner 0101, "
                                 "type 0008)")
    return _facial_record(data, block.start, block.end)


def _field(data: bytes, header: _Tlv, tag: int) -> int | None:
    """A two-byte field of the biometric header template, None if absent."""
    found = header.find(tag)
    if not found:
        return None
    if found[0].end - found[0].start != 2:
        raise DocumentUnreadable("bad_header", f"field {tag:02X} of the biometric header is "
                                 "not two bytes long")
    return int.from_bytes(data[found[0].start:found[0].end], "big")


def _facial_record(data: bytes, start: int, end: int) -> Portrait:
    """The first face of an ISO/IEC 19794-5:2005 record in data[start:end]."""
    if not data.startswith(FACE_RECORD_MAGIC, start):
        _not_a_2005_record(data, start, end)
    if end - start < GENERAL_HEADER_BYTES:
        raise DocumentUnreadable("truncated", "the facial record ends inside its header")
    version = data[start + 4:start + 8]
    if version != FACE_RECORD_VERSION:
        raise DocumentUnreadable("unsupported_version", "the facial record is not of the "
                                 "2005 edition (version 010) that ICAO 9303 prescribes")
    record_length, faces = struct.unpack_from(">IH", data, start + 8)
    if record_length > end - start:
        raise DocumentUnreadable("length_past_end", f"the facial record declares {record_length} "
                                 f"bytes but {end - start} are there")
    if record_length < GENERAL_HEADER_BYTES + FACIAL_INFORMATION_BYTES + IMAGE_INFORMATION_BYTES:
        raise DocumentUnreadable("truncated", "the facial record is too short to hold a face")
    if faces < 1:
        raise DocumentUnreadable("no_image", "the facial record holds no face image")
    end = start + record_length
    pos = start + GENERAL_HEADER_BYTES
    face_length, points = struct.unpack_from(">IH", data, pos)
    fixed = FACIAL_INFORMATION_BYTES + FEATURE_POINT_BYTES * points + IMAGE_INFORMATION_BYTES
    if face_length > end - pos:
        raise DocumentUnreadable("length_past_end", f"the face image record declares "
                                 f"{face_length} bytes but {end - pos} are left")
    if face_length <= fixed:
        raise DocumentUnreadable("no_image", f"the face image record ({face_length} bytes) "
                                 f"has no room for an image after its {points} feature "
                                 "points")
    info = pos + FACIAL_INFORMATION_BYTES + FEATURE_POINT_BYTES * points
    _, data_type, width, height = struct.unpack_from(">BBHH", data, info)
    if data_type not in IMAGE_DATA_TYPES:
        raise DocumentUnreadable("unsupported_image_type", f"the record's image data type is "
                                 f"{data_type}; a portrait is JPEG (0) or JPEG 2000 (1)")
    if max(width, height) > MAX_DECLARED_SIDE:
        raise DocumentUnreadable("declared_too_large", f"the record declares a "
                                 f"{width}x{height} image; no portrait is larger than "
                                 f"{MAX_DECLARED_SIDE} pixels a side")
    image = data[info + IMAGE_INFORMATION_BYTES:pos + face_length]
    image_type = IMAGE_DATA_TYPES[data_type]
    found = _signature(image)
    if found != image_type:
        raise DocumentUnreadable("image_type_mismatch", f"the record declares a {image_type} "
                                 f"image but holds {found}")
    return Portrait(image, image_type, (width, height), faces)


def _not_a_2005_record(data: bytes, start: int, end: int) -> None:
    """Raise the reason a data block that is not a ``FAC`` record is refused."""
    if end > start and data[start] in (0x30, 0x61, 0x7F, 0xA0, 0xA1):
        # an ASN.1 tagged record where the 2005 binary one should be
        raise DocumentUnreadable("iso39794_unsupported", "the portrait is encoded as "
                                 "ISO/IEC 39794-5, which this service does not read yet; "
                                 "check the traveller against the printed page")
    raise DocumentUnreadable("not_a_face_record", "the biometric data block is not an "
                             "ISO/IEC 19794-5 facial record (no FAC header)")


def _signature(image: bytes) -> str:
    if image.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if image.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    return "something else"


# -- BER-TLV ------------------------------------------------------------------------------

# The templates read into; any other constructed element (and every data block) is kept
# as opaque bytes, so nothing an issuer adds can make the parser recurse further.
_TEMPLATES = frozenset({DG2_TAG, _BIT_GROUP, _BIT, _BHT})


def _parse(data: bytes, pos: int, end: int, depth: int, counter: list[int],
           top: bool = False) -> list[_Tlv]:
    """The TLV elements in data[pos:end], templates read into (``top``: only the first)."""
    if depth > MAX_DEPTH:
        raise DocumentUnreadable("too_deep", f"templates nest more than {MAX_DEPTH} deep")
    out = []
    while pos < end:
        counter[0] += 1
        if counter[0] > MAX_ELEMENTS:
            raise DocumentUnreadable("too_many_elements", f"more than {MAX_ELEMENTS} "
                                     "elements; a DG2 holds a few dozen")
        tag, pos = _tag(data, pos, end)
        length, pos = _length(data, pos, end)
        children: tuple[_Tlv, ...] = ()
        if tag in _TEMPLATES:
            children = tuple(_parse(data, pos, pos + length, depth + 1, counter))
        out.append(_Tlv(tag, pos, pos + length, children))
        pos += length
        if top:
            break
    return out


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    first = data[pos]
    tag, pos = first, pos + 1
    if first & 0x1F == 0x1F:  # a multi-byte tag: more bytes while bit 8 is set
        for _ in range(2):
            if pos >= end:
                raise DocumentUnreadable("truncated", "the data ends inside a tag")
            tag = tag << 8 | data[pos]
            pos += 1
            if not data[pos - 1] & 0x80:
                return tag, pos
        raise DocumentUnreadable("bad_tag", "a tag longer than three bytes")
    return tag, pos


def _length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise DocumentUnreadable("truncated", "the data ends before a length field")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DocumentUnreadable("bad_length", "an indefinite length; a DG2 uses definite "
                                 "lengths only")
    else:
        size = first & 0x7F
        if size > 4:
            raise DocumentUnreadable("bad_length", f"a {size}-byte length field; a DG2 needs "
                                     "at most 4")
        if pos + size > end:
            raise DocumentUnreadable("truncated", "the data ends inside a length field")
        length = int.from_bytes(data[pos:pos + size], "big")
        pos += size
    if length > end - pos:
        raise DocumentUnreadable("length_past_end", f"an element declares {length} bytes but "
                                 f"{end - pos} are left")
    return length, pos
