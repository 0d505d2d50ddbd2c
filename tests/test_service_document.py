"""The passport chip at a real server on loopback: Verify and Clear against a document,
Enroll with a chip portrait, and hostile documents refused while the server keeps serving.

Documents are written by tests/dg2_writer.py around the committed test photos: the
portrait is cut and scaled to ICAO's 413 x 531 and compressed as chips hold it (JPEG 2000
at about 18 KB, a raw codestream) or as JPEG.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from dg2_writer import ICAO_PORTRAIT, JPEG, JPEG2000, chip_jpeg2000, dg2, encode, facial_record
from test_document import hostile_documents

from matcher.face.decode import decode_image
from matcher.v1 import matcher_pb2 as pb

MATCH, NO_MATCH = pb.Decision.Value("MATCH"), pb.Decision.Value("NO_MATCH")


def _portrait_pixels(photo: bytes) -> np.ndarray:
    """The photo cut around its centre to the ICAO aspect and scaled to 413 x 531."""
    from PIL import Image

    pixels = decode_image(photo)
    h, w = pixels.shape[:2]
    width, height = ICAO_PORTRAIT
    crop_w = min(w, h * width // height)
    crop_h = min(h, crop_w * height // width)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    image = Image.fromarray(pixels[top:top + crop_h, left:left + crop_w])
    return np.asarray(image.resize(ICAO_PORTRAIT, Image.Resampling.LANCZOS))


def chip_dg2(photo: bytes, data_type: int = JPEG2000) -> bytes:
    pixels = _portrait_pixels(photo)
    image = (chip_jpeg2000(pixels, 18_000, codestream=True) if data_type == JPEG2000
             else encode(pixels, "JPEG", quality=75))
    return dg2(facial_record(image, data_type, *ICAO_PORTRAIT))


@pytest.fixture(scope="module")
def photos(faces_dir: Path) -> dict[str, bytes]:
    names = ("obama_1.jpg", "obama_2.jpg", "obama_3.jpg", "biden_1.jpg", "biden_2.jpg",
             "kit_harington_1.jpg", "kit_harington_2.jpg", "rose_leslie_1.jpg")
    return {n: (faces_dir / n).read_bytes() for n in names}


def _stored(client) -> tuple[int, int, int]:
    info = client.gallery_info()
    return info.gallery_version, info.travellers, info.templates


def _audit_records(server) -> list[dict]:
    path = server.config.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("data_type", [JPEG2000, JPEG])
def test_verify_with_a_document_matches_its_holder_and_stores_nothing(client, photos,
                                                                      data_type) -> None:
    before = _stored(client)
    document = chip_dg2(photos["obama_1.jpg"], data_type)
    resp = client.verify("", photos["obama_2.jpg"], document=document)
    assert resp.decision == MATCH and resp.reason == "above_threshold"
    assert resp.traveller_id == "" and list(resp.checks_passed) == ["document"]
    assert resp.document.decision == MATCH and resp.document.score == resp.score
    assert resp.document.threshold == resp.threshold
    assert resp.document.sha256 == hashlib.sha256(document).hexdigest()
    assert resp.document.face.inter_eye_px > 30   # the portrait's face is reported
    other = client.verify("", photos["biden_1.jpg"], document=document)
    assert other.decision == NO_MATCH and other.reason == "below_threshold"
    assert not other.checks_passed and other.score < other.threshold
    assert _stored(client) == before   # no gallery involved, nothing stored


def test_document_threshold_is_the_single_photo_one_to_one(server, client, photos) -> None:
    decider = server.running.serving.engine.decider
    resp = client.verify("", photos["obama_2.jpg"], document=chip_dg2(photos["obama_1.jpg"]))
    assert resp.threshold == pytest.approx(decider.point_1to1_for(1).threshold, abs=1e-6)


def test_the_unpacked_portrait_is_taken_as_the_document(client, photos) -> None:
    """A chip reader that already unpacked the DG2 sends the JPEG 2000 itself."""
    jp2 = chip_jpeg2000(_portrait_pixels(photos["obama_1.jpg"]), 18_000)
    resp = client.verify("", photos["obama_3.jpg"], document=pb.Document(image=jp2))
    assert resp.decision == MATCH


def test_verify_with_a_document_and_a_traveller_is_refused(client, photos) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.verify("obama", photos["obama_2.jpg"], document=chip_dg2(photos["obama_1.jpg"]))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "use Clear" in refused.value.details()


def test_a_dg2_field_that_is_not_a_dg2_is_refused(client, photos) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.verify("", photos["obama_2.jpg"], document=pb.Document(dg2=photos["obama_1.jpg"]))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "document_unreadable:not_dg2" in refused.value.details()


def test_clear_with_a_document_checks_the_document_then_the_booking(client, enrolled,
                                                                    photos) -> None:
    document = chip_dg2(photos["obama_1.jpg"])
    both = client.clear("obama", photos["obama_2.jpg"], document=document)
    assert both.decision == MATCH and both.traveller_id == "obama"
    assert list(both.checks_passed) == ["document", "claim"]
    assert both.document.decision == MATCH
    # someone else's passport: the face does not match it, no booking is looked at
    stolen = client.clear("biden", photos["obama_2.jpg"], document=chip_dg2(
        photos["kit_harington_1.jpg"]))
    assert stolen.decision == NO_MATCH and stolen.reason == "document_mismatch"
    assert not stolen.checks_passed and not stolen.candidates and not stolen.fallback_used
    assert stolen.document.decision == NO_MATCH
    # no claim: the document, then the search
    searched = client.clear("", photos["obama_2.jpg"], document=document)
    assert searched.decision == MATCH and searched.traveller_id == "obama"
    assert list(searched.checks_passed) == ["document", "search"]


def test_the_audit_keeps_the_documents_sha256_and_nothing_of_its_face(server, client,
                                                                     photos) -> None:
    document = chip_dg2(photos["kit_harington_1.jpg"])
    resp = client.verify("", photos["kit_harington_2.jpg"], document=document,
                         request_id="doc-audit-1")
    assert resp.decision == MATCH
    (record,) = [r for r in _audit_records(server)
                 if r["fields"].get("request_id") == "doc-audit-1"]
    fields = record["fields"]
    assert fields["document_sha256"] == hashlib.sha256(document).hexdigest()
    assert fields["document_decision"] == "MATCH"
    assert fields["document_score"] == pytest.approx(resp.score, abs=1e-6)
    assert not {k for k in fields if "template" in k or "image" in k or "portrait" in k}


def test_a_booking_of_a_selfie_and_a_chip_portrait_enrols_and_clears(client, photos) -> None:
    """Enroll takes the DG2 among the photos (decoded like any photo); the traveller then
    clears with one capture."""
    document = chip_dg2(photos["rose_leslie_1.jpg"])
    selfie = _portrait_pixels(photos["rose_leslie_1.jpg"])[::-1, ::-1].copy()  # not the chip
    resp = client.enroll("rose-chip", [encode(selfie[::-1, ::-1], "JPEG", quality=92),
                                       document])
    assert resp.added_templates == 2
    info = client.get_traveller("rose-chip")
    assert hashlib.sha256(document).hexdigest() in info.photo_sha256
    capture = encode(decode_image(photos["rose_leslie_1.jpg"]), "PNG")
    cleared = client.clear("rose-chip", capture)
    assert cleared.decision == MATCH and cleared.traveller_id == "rose-chip"


def test_hostile_documents_are_refused_and_the_server_keeps_serving(client, photos) -> None:
    """Every hostile document: INVALID_ARGUMENT naming the reason, nothing stored, the next
    request answered. The slowest refusal is printed, not bounded (a loaded shared box can
    stall any call; the refusal itself is a header parse)."""
    good = chip_dg2(photos["obama_1.jpg"])
    slowest = 0.0
    for name, data in hostile_documents().items():
        before = _stored(client)
        for call in (lambda d=data: client.verify("", photos["obama_2.jpg"], document=d),
                     lambda d=data: client.clear("obama", photos["obama_2.jpg"], document=d),
                     lambda d=data: client.enroll("hostile-doc", [d])):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                call()
            slowest = max(slowest, time.monotonic() - started)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
            assert "document_unreadable:" in refused.value.details(), (name, refused.value)
        assert _stored(client) == before, name
        assert client.verify("", photos["obama_2.jpg"], document=good).decision == MATCH
    print(f"slowest hostile-document refusal: {1e3 * slowest:.1f} ms")


def test_the_cli_verifies_against_a_dg2_and_enrols_and_compares_one(server, photos, tmp_path,
                                                                    capsys) -> None:
    from matcher.cli import main

    document = tmp_path / "dg2.bin"
    document.write_bytes(chip_dg2(photos["obama_1.jpg"]))
    capture = tmp_path / "capture.jpg"
    capture.write_bytes(photos["obama_2.jpg"])
    address = ["--server", server.address]
    assert main(["verify", *address, "--document", str(document), str(capture)]) == 0
    line = capsys.readouterr().out
    assert "capture.jpg: MATCH" in line and "document MATCH" in line
    assert "passed: document" in line
    assert main(["enroll", *address, "cli-chip", str(document), str(capture)]) == 0
    assert "2 template(s) added" in capsys.readouterr().out
    assert main(["compare", str(document), str(capture)]) == 0
    assert float(capsys.readouterr().out.strip()) > 0.5


def test_the_overnight_manifest_enrols_a_dg2_among_a_travellers_photos(photos,
                                                                       tmp_path) -> None:
    import csv
    import sqlite3

    from matcher.gallery.primary import STORE_FILE
    from matcher.reindex.job import ReindexConfig, run_reindex

    document = tmp_path / "T-CHIP.dg2"
    document.write_bytes(chip_dg2(photos["obama_1.jpg"]))
    selfie = tmp_path / "selfie.jpg"
    selfie.write_bytes(photos["obama_3.jpg"])
    manifest = tmp_path / "bookings.csv"
    now = time.time()
    window = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in (now, now + 86_400)]
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["traveller_id", "photo", "valid_from", "valid_to"])
        w.writerows([["T-CHIP", str(document), *window], ["T-CHIP", str(selfie), *window]])
    data_dir = tmp_path / "data"
    run_reindex(ReindexConfig(manifest, data_dir, use_ray=False, progress=False))
    with sqlite3.connect(data_dir / STORE_FILE) as conn:
        (rows,) = conn.execute("SELECT COUNT(*) FROM templates WHERE traveller_id='T-CHIP'"
                               ).fetchone()
    assert rows == 2
