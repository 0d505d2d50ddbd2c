"""One rule for which face of a booking photo is enrolled (issue 18): Enroll and the
overnight re-index refuse the same photos with the same reason code."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageFilter
from service_helpers import ServerThread, read_labels, server_config

from matcher.client import MatcherClient
from matcher.face import enrolment
from matcher.face.enrolment import MULTIPLE_FACES, NO_FACE, face_verdict
from matcher.reindex import embedding, manifest
from matcher.reindex.embedding import PhotoEmbedder

pytestmark = pytest.mark.slow

GROUPS = ("group_two_people.jpg", "group_kit_harington_rose_leslie.jpg",
          "group_obama_biden.jpg")


@pytest.fixture(scope="module")
def refused(faces_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Booking photos both paths must refuse: the group photos, one without a face, one
    blurred past the quality gate."""
    folder = tmp_path_factory.mktemp("refused")
    out = {name: faces_dir / name for name in GROUPS}
    with Image.open(faces_dir / "obama_3.jpg") as im:  # his suit, no face
        im.crop((0, 1200, im.width, im.height)).convert("RGB").save(folder / "no_face.jpg")
    with Image.open(faces_dir / "obama_1.jpg") as im:
        im.convert("RGB").filter(ImageFilter.GaussianBlur(8)).save(folder / "blurred.jpg")
    out["no_face.jpg"] = folder / "no_face.jpg"
    out["blurred.jpg"] = folder / "blurred.jpg"
    return out


@pytest.fixture(scope="module")
def reindex_reasons(refused: dict[str, Path]) -> dict[str, str]:
    """What the overnight job's embedder says of each photo."""
    names = list(refused)
    shas = [hashlib.sha256(refused[n].read_bytes()).hexdigest() for n in names]
    reasons, _ = PhotoEmbedder().embed(shas, [str(refused[n]) for n in names])
    return dict(zip(names, reasons, strict=True))


@pytest.fixture(scope="module")
def client(tmp_path_factory, pipeline):
    with ServerThread(server_config(tmp_path_factory.mktemp("enrol-rule")), pipeline) as srv, \
            MatcherClient(srv.address, timeout=30.0) as c:
        yield c


def _refusal(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details()


def _code(details: str, photo: int = 1) -> str:
    """The reason code an Enroll refusal names for photo ``photo``."""
    prefix = f"photo {photo} refused: "
    assert prefix in details, details
    return details.split(prefix, 1)[1].split(" ", 1)[0]


def test_one_rule_and_one_set_of_codes():
    assert embedding.face_verdict is enrolment.face_verdict
    assert (manifest.NO_FACE, manifest.MULTIPLE_FACES, manifest.LOW_QUALITY) == \
        (enrolment.NO_FACE, enrolment.MULTIPLE_FACES, enrolment.LOW_QUALITY)


def test_the_verdict_on_the_shared_photos(pipeline, faces_dir):
    for row in read_labels(faces_dir):
        faces = pipeline.analyse_bytes((faces_dir / row["file"]).read_bytes())
        face, reason = face_verdict(faces)
        if row["faces"] != "1":
            assert (face, reason) == (None, MULTIPLE_FACES), row["file"]
            # the operator's override is for quality only, never for a second person
            assert face_verdict(faces, accept_low_quality=True) == (None, MULTIPLE_FACES)
        else:
            assert reason.split(":")[0] not in (NO_FACE, MULTIPLE_FACES), row["file"]
            assert (face is None) == bool(reason)
    assert face_verdict([]) == (None, NO_FACE)


def test_the_reindex_refuses_them(reindex_reasons):
    assert {n: reindex_reasons[n] for n in GROUPS} == {n: MULTIPLE_FACES for n in GROUPS}
    assert reindex_reasons["no_face.jpg"] == NO_FACE
    assert reindex_reasons["blurred.jpg"].startswith("low_quality:")
    assert "blurred" in reindex_reasons["blurred.jpg"]


def test_enroll_refuses_them_with_the_reindex_code(client, refused, reindex_reasons,
                                                   faces_dir):
    for name, path in refused.items():
        details = _refusal(lambda path=path: client.enroll("T-REFUSED", [path.read_bytes()]))
        assert _code(details) == reindex_reasons[name], (name, details)
        assert "request_id=" in details
    two = _refusal(lambda: client.enroll("T-REFUSED", [refused["group_two_people.jpg"]
                                                       .read_bytes()]))
    assert ("photo 1 refused: multiple_faces (a second face at least 10% the size of the "
            "largest; send a photo of the traveller alone)") in two
    # The second photo of a booking is held to the same rule; nothing is enrolled.
    good = (faces_dir / "obama_1.jpg").read_bytes()
    details = _refusal(lambda: client.enroll(
        "T-REFUSED", [good, refused["group_obama_biden.jpg"].read_bytes()]))
    assert _code(details, photo=2) == MULTIPLE_FACES
    assert _refusal(lambda: client.enroll(
        "T-REFUSED", [refused["group_two_people.jpg"].read_bytes()],
        accept_low_quality=True)).count("multiple_faces") == 1
    with pytest.raises(grpc.RpcError) as info:
        client.get_traveller("T-REFUSED")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_enroll_stream_refuses_them_item_by_item(client, refused, reindex_reasons, faces_dir):
    requests = [client.enroll_request("T-STREAM-1", [(faces_dir / "biden_1.jpg").read_bytes()]),
                client.enroll_request("T-STREAM-2",
                                      [refused["group_kit_harington_rose_leslie.jpg"]
                                       .read_bytes()])]
    answers = list(client.enroll_stream(requests, timeout=60))
    assert not answers[0].HasField("error") and answers[0].added_templates == 1
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _code(answers[1].error.message) == \
        reindex_reasons["group_kit_harington_rose_leslie.jpg"] == MULTIPLE_FACES
    client.remove("T-STREAM-1")


def test_accept_low_quality_still_lets_a_low_quality_face_through(client, refused):
    blurred = refused["blurred.jpg"].read_bytes()
    assert _code(_refusal(lambda: client.enroll("T-BLUR", [blurred]))).startswith("low_quality:")
    resp = client.enroll("T-BLUR", [blurred], accept_low_quality=True)
    assert resp.added_templates == 1
    client.remove("T-BLUR")
