"""Multi-frame probes end to end (issue 18): 1 to 8 frames of one traveller, one batch,
the usable frames' templates fused and matched once; a real server on a loopback port."""
from __future__ import annotations

import io
import json
import time

import grpc
import numpy as np
import pytest
from PIL import Image, ImageFilter

from matcher.client import make_probe
from matcher.face.frames import FRAMES_DISAGREE
from matcher.service.analysis import ImageJob
from matcher.service.audit import read_records
from matcher.templates import fuse_templates
from matcher.v1 import matcher_pb2 as pb

pytestmark = pytest.mark.slow


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(faces_dir) -> dict[str, bytes]:
    """Frames to send: real photos, two without any face, one blurred past the gate."""
    ramp = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    blurred = Image.open(faces_dir / "obama_4.jpg").convert("RGB").filter(
        ImageFilter.GaussianBlur(8))
    out = {name: (faces_dir / name).read_bytes() for name in (
        "obama_2.jpg", "obama_3.jpg", "obama_4.jpg", "obama_small.jpg", "biden_2.jpg",
        "kit_harington_2.jpg", "kit_harington_3.jpg")}
    out["ramp"] = _png(Image.fromarray(np.dstack([ramp] * 3)))
    out["grey"] = _png(Image.new("RGB", (200, 200), "grey"))
    out["blurred"] = _png(blurred)
    return out


def _unit() -> np.ndarray:
    unit = np.zeros(512, np.float32)
    unit[0] = 1.0
    return unit


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _batch_metrics(server) -> tuple[float, float]:
    """(batches, frames) the model batcher has run so far, from the Prometheus metrics."""
    values = {}
    for line in server.running.metrics.render().decode().splitlines():
        if line.startswith(("matcher_batch_size_count", "matcher_batch_size_sum")):
            name, value = line.split()
            values[name] = float(value)
    return values["matcher_batch_size_count"], values["matcher_batch_size_sum"]


# -- fusion decides ---------------------------------------------------------------------

def test_two_frames_of_the_same_traveller_fused_match(client, enrolled, photos):
    frames = [photos["obama_2.jpg"], photos["obama_4.jpg"]]
    for resp in (client.identify(frames=frames), client.verify("obama", frames=frames),
                 client.clear("obama", frames=frames)):
        assert resp.decision == pb.MATCH and resp.traveller_id == "obama", resp.reason
        assert resp.frames_used == 2 and resp.score >= resp.threshold
        assert [(f.index, f.status) for f in resp.frames] == [(0, "used"), (1, "used")]
        assert all(f.faces_found == 1 and f.face.x2 > f.face.x1 for f in resp.frames)
        assert resp.faces_found == 1 and resp.HasField("face")
        for stage in ("queue", "decode", "detect", "embed", "search", "total"):
            assert stage in resp.timings_ms


def test_a_frame_without_a_usable_face_is_skipped_and_says_why(client, enrolled, photos):
    resp = client.identify(frames=[photos["ramp"], photos["kit_harington_2.jpg"]])
    assert resp.decision == pb.MATCH and resp.traveller_id == "kit_harington"
    assert resp.frames_used == 1
    assert [f.status for f in resp.frames] == ["no_face", "used"]
    assert resp.frames[0].faces_found == 0 and not resp.frames[0].HasField("face")
    # The answer is the used frame's, as if it had been sent alone.
    alone = client.identify(photos["kit_harington_2.jpg"])
    assert resp.score == pytest.approx(alone.score, abs=2e-3)

    low = client.verify("obama", frames=[photos["blurred"], photos["obama_2.jpg"]])
    assert low.decision == pb.MATCH and low.frames_used == 1
    assert low.frames[0].status == "low_quality" and "blurred" in low.frames[0].quality_reasons
    assert low.frames[0].faces_found == 1 and low.frames[0].HasField("face")
    assert low.frames[1].status == "used" and not low.frames[1].quality_reasons
    assert not low.quality_reasons  # the decision's face is usable


def test_no_usable_frame_is_no_face_or_low_quality(client, enrolled, photos):
    none = client.identify(frames=[photos["ramp"], photos["grey"], photos["ramp"]])
    assert none.decision == pb.NO_FACE and none.reason == "no_face"
    assert none.frames_used == 0 and none.faces_found == 0 and not none.HasField("face")
    assert [f.status for f in none.frames] == ["no_face"] * 3
    # A face that fails the gate beats no face at all: the best frame's reasons answer.
    low = client.clear("obama", frames=[photos["grey"], photos["blurred"]])
    assert low.decision == pb.LOW_QUALITY and low.reason == "low_quality"
    assert "blurred" in low.quality_reasons and low.frames_used == 0
    assert list(low.quality_reasons) == list(low.frames[1].quality_reasons)
    assert low.faces_found == 1 and low.face.x2 > low.face.x1


def test_frames_of_two_people_are_not_fused(client, enrolled, photos, server):
    """A second person's frame (a tailgater) must not lend its face to the fused probe;
    the answer names the "same person" score the frames were held to (Decider's)."""
    frames = [photos["obama_2.jpg"], photos["biden_2.jpg"]]
    same_person = server.running.serving.engine.decider.same_person
    for resp in (client.identify(frames=frames), client.verify("obama", frames=frames),
                 client.verify("biden", frames=frames), client.clear("biden", frames=frames)):
        assert resp.decision == pb.NO_MATCH and resp.reason == FRAMES_DISAGREE
        assert resp.threshold == pytest.approx(same_person, abs=1e-6)
        assert resp.traveller_id == "" and not resp.candidates
        assert [f.status for f in resp.frames] == ["used", "used"]


def test_template_and_aligned_faces_may_be_frames(client, enrolled, faces_dir, pipeline):
    image = pipeline.decode((faces_dir / "obama_2.jpg").read_bytes())
    face = pipeline.analyse(image)[0]
    blob = pipeline.align(image, face.kps[None])[0]
    crop = np.clip(np.rint(blob.transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
    resp = client.identify(frames=[make_probe(template=face.template),
                                    make_probe(aligned=crop),
                                    (faces_dir / "obama_4.jpg").read_bytes()])
    assert resp.decision == pb.MATCH and resp.traveller_id == "obama"
    assert resp.frames_used == 3 and [f.status for f in resp.frames] == ["used"] * 3
    assert resp.frames[0].faces_found == 0 and not resp.frames[0].HasField("face")
    assert resp.faces_found == 1 and resp.HasField("face")  # the photo's face
    templates_only = client.identify(frames=[make_probe(template=face.template)] * 2)
    assert templates_only.decision == pb.MATCH and templates_only.faces_found == 0
    assert not templates_only.HasField("face")


# -- the fused template -----------------------------------------------------------------

def test_the_fused_template_is_the_mean_of_the_single_frame_templates(server, client,
                                                                      enrolled, photos):
    names = ["obama_2.jpg", "obama_3.jpg", "obama_small.jpg"]
    engine = server.running.engine
    single = [server.call(engine.analyse_frames([ImageJob(photos[n])], None)).template
              for n in names]
    fused = server.call(engine.analyse_frames([ImageJob(photos[n]) for n in names], None))
    expected = fuse_templates(np.stack(single))
    assert fused.frames_used == 3 and fused.agree
    np.testing.assert_allclose(fused.template, expected, atol=2e-3)
    assert float(fused.template @ expected) > 0.9999
    assert np.linalg.norm(fused.template) == pytest.approx(1.0, abs=1e-5)
    # Over the wire: the frames answer as that fused template sent as a template probe.
    by_frames = client.verify("obama", frames=[photos[n] for n in names])
    by_template = client.verify("obama", template=expected)
    assert by_frames.decision == by_template.decision == pb.MATCH
    assert by_frames.score == pytest.approx(by_template.score, abs=2e-3)


def test_four_frames_are_one_model_batch(server, client, enrolled, photos):
    frames = [photos[n] for n in ("obama_2.jpg", "obama_3.jpg", "obama_4.jpg",
                                  "obama_small.jpg")]
    batches, units = _batch_metrics(server)
    resp = client.identify(frames=frames)
    assert resp.decision == pb.MATCH and resp.frames_used == 4
    after_batches, after_units = _batch_metrics(server)
    assert (after_batches - batches, after_units - units) == (1, 4)


# -- what stays as it was, and what is refused -------------------------------------------

def test_a_single_probe_answers_as_before(client, enrolled, photos, faces_dir):
    one = client.identify(photos["biden_2.jpg"])
    assert one.decision == pb.MATCH and one.frames_used == 1 and not one.frames
    as_frame = client.identify(frames=[photos["biden_2.jpg"]])
    assert as_frame.decision == pb.MATCH and as_frame.traveller_id == one.traveller_id
    assert as_frame.score == pytest.approx(one.score, abs=1e-6)
    assert as_frame.frames_used == 1 and [f.status for f in as_frame.frames] == ["used"]
    blank = client.identify(photos["ramp"])
    assert blank.decision == pb.NO_FACE and blank.frames_used == 0 and not blank.frames
    group = client.identify((faces_dir / "group_two_people.jpg").read_bytes(), all_faces=True)
    assert group.frames_used == 1 and len(group.faces) == 2 and not group.frames


def test_bad_frame_requests_are_invalid_argument(client, enrolled, photos, server):
    stub = client.stub
    good = pb.Probe(image=photos["obama_2.jpg"])
    cases = {
        "9 frames": (lambda: stub.Identify(pb.IdentifyRequest(frames=[good] * 9), timeout=10),
                     "at most 8 frames"),
        "probe and frames": (lambda: stub.Verify(pb.VerifyRequest(
            probe=good, frames=[good], traveller_id="obama"), timeout=10),
            "either probe or frames"),
        "all_faces with frames": (lambda: client.identify(frames=[photos["obama_2.jpg"]] * 2,
                                                          all_faces=True), "all_faces"),
        "an unreadable frame": (lambda: client.clear("obama", frames=[
            photos["obama_2.jpg"], b"not an image"]), "frames[1]"),
        "an unreadable frame after a template": (lambda: client.identify(frames=[
            make_probe(template=_unit()), photos["obama_2.jpg"], b"not an image"]),
            "frames[2]"),
        "an empty frame": (lambda: stub.Identify(pb.IdentifyRequest(
            frames=[good, pb.Probe()]), timeout=10), "frames[1]"),
        "a short template frame": (lambda: client.identify(frames=[
            good, make_probe(template=np.ones(10, np.float32))]), "frames[1]"),
    }
    for name, (call, words) in cases.items():
        code, details = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert words in details and "request_id=" in details, (name, details)
    lane = list(client.lane_stream([pb.LaneRequest(identify=pb.IdentifyRequest(
        frames=[good] * 9, request_id="nine"))], timeout=60))
    assert lane[0].request_id == "nine"
    assert lane[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert client.identify(frames=[photos["obama_2.jpg"]]).traveller_id == "obama"
    with pytest.raises(ValueError):
        client.identify(photos["obama_2.jpg"], frames=[photos["obama_2.jpg"]])


def test_lane_stream_takes_frames(client, enrolled, photos):
    def frames(*names: str) -> list[pb.Probe]:
        return [pb.Probe(image=photos[n]) for n in names]

    requests = [
        pb.LaneRequest(identify=pb.IdentifyRequest(frames=frames("obama_2.jpg", "obama_4.jpg"),
                                                   request_id="a")),
        pb.LaneRequest(verify=pb.VerifyRequest(frames=frames("ramp", "kit_harington_3.jpg"),
                                               traveller_id="kit_harington", request_id="b")),
        pb.LaneRequest(clear=pb.ClearRequest(frames=frames("grey", "ramp"),
                                             claimed_traveller_id="obama", request_id="c")),
    ]
    answers = {a.request_id: a.result for a in client.lane_stream(requests, timeout=60)}
    assert answers["a"].decision == pb.MATCH and answers["a"].frames_used == 2
    assert answers["b"].decision == pb.MATCH and answers["b"].frames_used == 1
    assert [f.status for f in answers["b"].frames] == ["no_face", "used"]
    assert answers["c"].decision == pb.NO_FACE and answers["c"].frames_used == 0


# -- records and gallery facts -----------------------------------------------------------

def test_audit_records_frames_used_and_nothing_of_the_faces(server, client, enrolled, photos):
    client.verify("obama", frames=[photos["ramp"], photos["obama_2.jpg"], photos["obama_4.jpg"]],
                  request_id="frames-audit")
    records = [r for r in read_records(server.config.data_dir / "audit.log")
               if r["fields"].get("request_id") == "frames-audit"]
    assert len(records) == 1 and records[0]["fields"]["frames_used"] == 2
    assert records[0]["fields"]["decision"] == "MATCH"
    assert all(not isinstance(v, (list, dict)) for v in records[0]["fields"].values())
    assert len(json.dumps(records[0])) < 2000


def test_gallery_info_counts_the_travellers_searchable_now(client, enrolled, photos):
    info = client.gallery_info()
    assert info.searchable_travellers == info.travellers == len(enrolled)
    tomorrow = time.time() + 86_400
    client.enroll("booked-tomorrow", [photos["kit_harington_3.jpg"]], valid_from=tomorrow,
                  valid_to=tomorrow + 86_400)
    try:
        later = client.gallery_info()
        assert later.travellers == len(enrolled) + 1
        assert later.searchable_travellers == len(enrolled)
    finally:
        client.remove("booked-tomorrow")


def test_the_cli_sends_several_photos_as_frames(server, enrolled, faces_dir, capsys):
    from matcher.cli import main

    address = ["--server", server.address]
    files = [str(faces_dir / "obama_2.jpg"), str(faces_dir / "obama_4.jpg")]
    assert main(["identify", *address, "--frames", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("obama_2.jpg+obama_4.jpg: MATCH  obama  score ")
    assert "frames used 2/2" in out[0]
    assert out[1:] == ["  frame 0 obama_2.jpg: used", "  frame 1 obama_4.jpg: used"]
    assert main(["verify", *address, "--frames", "--json", "obama", *files]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["decision"] == "MATCH" and record["frames_used"] == 2
    assert [f["status"] for f in record["frames"]] == ["used", "used"]
    many = [files[0]] * 9
    assert main(["identify", *address, "--frames", *many]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
