"""End to end: a real server on a loopback port, the generated client, the shared photos."""
from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, ImageFilter
from service_helpers import ServerThread, read_labels, server_config

from matcher.client import MatcherClient, make_probe
from matcher.face.models import demo_photo
from matcher.service.audit import read_records, verify_chain
from matcher.v1 import matcher_pb2 as pb

pytestmark = pytest.mark.slow


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _single_face_rows(faces_dir: Path) -> list[dict[str, str]]:
    return [r for r in read_labels(faces_dir) if r["faces"] == "1"]


# -- serving basics -----------------------------------------------------------------------

def test_health_is_serving_and_reflection_lists_the_service(server, client):
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.health("matcher.v1.Matcher") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answers = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "matcher.v1.Matcher" in names and "grpc.health.v1.Health" in names


def test_gallery_info_reports_version_size_model_and_thresholds(client, enrolled):
    info = client.gallery_info()
    assert info.travellers == len(enrolled)
    assert info.gallery_version >= len(enrolled)
    assert info.model_id.startswith("scrfd500m-mbf-w600k@")
    assert info.index_kind == "flat" and info.role == "writer"
    assert 0.2 <= info.threshold_1to1 < 0.6 and 0.2 <= info.threshold_1ton < 0.6


def test_get_traveller_returns_booking_facts_not_templates(client, enrolled, faces_dir):
    import hashlib

    identity, file = next(iter(enrolled.items()))
    info = client.get_traveller(identity)
    assert info.templates == 1
    assert list(info.photo_sha256) == [hashlib.sha256((faces_dir / file).read_bytes()).hexdigest()]
    assert info.valid_to.seconds - info.valid_from.seconds == 24 * 3600


# -- matching the shared photos -------------------------------------------------------

def test_identify_every_single_face_photo(client, enrolled, faces_dir):
    for row in _single_face_rows(faces_dir):
        resp = client.identify((faces_dir / row["file"]).read_bytes(), request_id=row["file"])
        assert resp.request_id == row["file"]
        assert resp.decision == pb.MATCH, (row["file"], resp.reason, resp.score)
        assert resp.traveller_id == row["identity"], row["file"]
        assert resp.score >= resp.threshold and resp.faces_found == 1
        assert resp.candidates[0].traveller_id == row["identity"]
        assert resp.face.x2 > resp.face.x1 and len(resp.face.landmarks) == 10
        for stage in ("queue", "decode", "detect", "embed", "search", "total"):
            assert stage in resp.timings_ms
        assert resp.model_id and resp.gallery_version >= len(enrolled)


def test_verify_every_single_face_photo_against_right_and_wrong_claims(client, enrolled,
                                                                       faces_dir):
    identities = sorted(enrolled)
    for row in _single_face_rows(faces_dir):
        data = (faces_dir / row["file"]).read_bytes()
        right = client.verify(row["identity"], data)
        assert right.decision == pb.MATCH and right.traveller_id == row["identity"], row["file"]
        wrong_id = identities[(identities.index(row["identity"]) + 1) % len(identities)]
        wrong = client.verify(wrong_id, data)
        assert wrong.decision == pb.NO_MATCH and wrong.reason == "below_threshold"
        assert wrong.score < wrong.threshold


def test_clear_confirms_a_true_claim_and_falls_back_on_a_false_one(client, enrolled,
                                                                   faces_dir):
    identities = sorted(enrolled)
    for row in _single_face_rows(faces_dir):
        data = (faces_dir / row["file"]).read_bytes()
        ok = client.clear(row["identity"], data)
        assert ok.decision == pb.MATCH and ok.traveller_id == row["identity"]
        assert not ok.fallback_used
        other = identities[(identities.index(row["identity"]) + 1) % len(identities)]
        fallback = client.clear(other, data)
        assert fallback.fallback_used and fallback.claimed_traveller_id == other
        assert fallback.decision == pb.MATCH and fallback.traveller_id == row["identity"]


def test_group_photos_answer_for_every_face(client, enrolled, faces_dir):
    for row in read_labels(faces_dir):
        if row["faces"] == "1":
            continue
        resp = client.identify((faces_dir / row["file"]).read_bytes(), all_faces=True)
        assert resp.faces_found == int(row["faces"]) == len(resp.faces)
        matched = sorted(f.traveller_id for f in resp.faces if f.decision == pb.MATCH)
        expected = sorted(p for p in row["identity"].split(";") if p != "unknown")
        assert matched == expected, row["file"]
        unknown = [f for f in resp.faces if f.decision != pb.MATCH]
        assert len(unknown) == row["identity"].split(";").count("unknown")
        areas = [(f.face.x2 - f.face.x1) * (f.face.y2 - f.face.y1) for f in resp.faces]
        assert areas == sorted(areas, reverse=True)  # the top-level answer is the largest


def test_unknown_face_is_no_match(client, enrolled):
    resp = client.identify(demo_photo("yaoming.jpg").read_bytes())
    assert resp.decision == pb.NO_MATCH and resp.reason == "below_threshold"
    assert resp.traveller_id == "" and resp.score < resp.threshold


def test_aligned_and_template_probes_match_like_the_photo(client, enrolled, faces_dir,
                                                          pipeline):
    image = pipeline.decode((faces_dir / "obama_2.jpg").read_bytes())
    face = pipeline.analyse(image)[0]
    blob = pipeline.align(image, face.kps[None])[0]                      # (3, 112, 112)
    crop = np.clip(np.rint(blob.transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
    by_raw = client.identify(aligned=crop)
    by_png = client.identify(aligned=_png(Image.fromarray(crop)))
    by_template = client.identify(template=face.template)
    for resp in (by_raw, by_png, by_template):
        assert resp.decision == pb.MATCH and resp.traveller_id == "obama"
        assert resp.faces_found == 0 and not resp.HasField("face")
    photo = client.identify((faces_dir / "obama_2.jpg").read_bytes())
    assert by_template.score == pytest.approx(photo.score, abs=1e-4)
    assert by_raw.score == pytest.approx(photo.score, abs=0.02)


def test_no_face_and_low_quality_are_decisions(client, enrolled, faces_dir):
    ramp = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    blank = client.identify(_png(Image.fromarray(np.dstack([ramp] * 3))))
    assert blank.decision == pb.NO_FACE and blank.faces_found == 0
    blurred = Image.open(faces_dir / "obama_4.jpg").convert("RGB").filter(
        ImageFilter.GaussianBlur(8))
    low = client.identify(_png(blurred))
    assert low.decision == pb.LOW_QUALITY and "blurred" in low.quality_reasons
    assert low.faces_found == 1 and low.face.x2 > low.face.x1 and low.traveller_id == ""


# -- writes -----------------------------------------------------------------------------

def test_enrol_then_remove_a_traveller(client, enrolled, faces_dir):
    probe = (faces_dir / "rose_leslie_2.jpg").read_bytes()
    enrolled_at = client.enroll("temp-traveller",
                                [(faces_dir / "rose_leslie_1.jpg").read_bytes()]).gallery_version
    assert client.verify("temp-traveller", probe).decision == pb.MATCH
    # Two travellers with the same face: identification is ambiguous, never a guess.
    ambiguous = client.identify(probe)
    assert ambiguous.decision == pb.NO_MATCH and ambiguous.reason == "ambiguous"
    removed = client.remove("temp-traveller")
    assert removed.gallery_version == enrolled_at + 1   # the removal is the next change
    after = client.identify(probe)
    assert after.gallery_version == removed.gallery_version  # answered without the traveller
    assert after.decision == pb.MATCH and after.traveller_id == "rose_leslie"
    assert "temp-traveller" not in [c.traveller_id for c in after.candidates]
    assert _code(lambda: client.get_traveller("temp-traveller")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.remove("temp-traveller")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.verify("temp-traveller", probe)) == grpc.StatusCode.NOT_FOUND


def test_enrol_is_idempotent_for_the_same_photo_and_window(client, faces_dir):
    photo = (faces_dir / "kit_harington_2.jpg").read_bytes()
    first = client.enroll("idem", [photo], valid_from=1_700_000_000, valid_to=4_000_000_000)
    again = client.enroll("idem", [photo], valid_from=1_700_000_000, valid_to=4_000_000_000)
    assert first.changed and not again.changed and again.added_templates == 0
    assert again.gallery_version == first.gallery_version
    client.remove("idem")


def test_enroll_stream_answers_each_item_in_order(client, faces_dir):
    good = (faces_dir / "biden_2.jpg").read_bytes()
    requests = [client.enroll_request("bulk-1", [good]),
                client.enroll_request("bulk-2", [b"not an image"]),
                client.enroll_request("bulk-3", [good])]
    answers = list(client.enroll_stream(requests, timeout=60))
    assert [a.traveller_id for a in answers] == ["bulk-1", "bulk-2", "bulk-3"]
    assert not answers[0].HasField("error") and answers[0].added_templates == 1
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not answers[2].HasField("error")
    client.remove("bulk-1")
    client.remove("bulk-3")


def test_lane_stream_answers_every_request_by_id(client, enrolled, faces_dir):
    def ident(file: str, rid: str) -> pb.LaneRequest:
        return pb.LaneRequest(identify=pb.IdentifyRequest(
            probe=pb.Probe(image=(faces_dir / file).read_bytes()), request_id=rid))

    requests = [ident("obama_1.jpg", "a"), ident("biden_1.jpg", "b"),
                pb.LaneRequest(identify=pb.IdentifyRequest(probe=pb.Probe(image=b"junk"),
                                                           request_id="c")),
                pb.LaneRequest(verify=pb.VerifyRequest(
                    probe=pb.Probe(image=(faces_dir / "kit_harington_3.jpg").read_bytes()),
                    traveller_id="kit_harington", request_id="d"))]
    answers = {a.request_id: a for a in client.lane_stream(requests, timeout=60)}
    assert set(answers) == {"a", "b", "c", "d"}
    assert answers["a"].result.traveller_id == "obama"
    assert answers["b"].result.traveller_id == "biden"
    assert answers["c"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["d"].result.decision == pb.MATCH


# -- bad input: each gets its status code, and the server keeps serving ------------------

def test_each_bad_input_gets_its_status_code(client, enrolled, faces_dir, server):
    photo = (faces_dir / "obama_1.jpg").read_bytes()
    stub = client.stub
    unit = np.zeros(512, np.float32)
    unit[0] = 1.0
    cases = {
        "empty image": (lambda: client.identify(b""), grpc.StatusCode.INVALID_ARGUMENT),
        "not an image": (lambda: client.identify(b"\x89PNG\r\n\x1a\n garbage"),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "truncated jpeg": (lambda: client.identify(photo[: len(photo) // 3]),
                           grpc.StatusCode.INVALID_ARGUMENT),
        "no probe": (lambda: stub.Identify(pb.IdentifyRequest(), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT),
        "short template": (lambda: client.identify(template=unit[:100]),
                           grpc.StatusCode.INVALID_ARGUMENT),
        "nan template": (lambda: client.identify(template=np.full(512, np.nan, np.float32)),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "non-unit template": (lambda: client.identify(template=unit * 3),
                              grpc.StatusCode.INVALID_ARGUMENT),
        "other model's template": (
            lambda: stub.Identify(pb.IdentifyRequest(
                probe=make_probe(template=unit, model_id="arcface-r100@000000000000")),
                timeout=10), grpc.StatusCode.FAILED_PRECONDITION),
        "raw aligned face of the wrong size": (
            lambda: stub.Identify(pb.IdentifyRequest(probe=pb.Probe(aligned=pb.AlignedFace(
                data=b"\0" * 100, format=pb.AlignedFace.RAW_RGB))), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT),
        "encoded aligned face of the wrong size": (
            lambda: client.identify(aligned=photo), grpc.StatusCode.INVALID_ARGUMENT),
        "top_k too large": (lambda: client.identify(photo, top_k=1000),
                            grpc.StatusCode.INVALID_ARGUMENT),
        "verify without traveller id": (lambda: client.verify("", photo),
                                        grpc.StatusCode.INVALID_ARGUMENT),
        "verify unknown traveller": (lambda: client.verify("nobody-booked", photo),
                                     grpc.StatusCode.NOT_FOUND),
        "remove unknown traveller": (lambda: client.remove("nobody-booked"),
                                     grpc.StatusCode.NOT_FOUND),
        "enrol a photo without a face": (
            lambda: client.enroll("x", [_png(Image.new("RGB", (200, 200), "grey"))]),
            grpc.StatusCode.INVALID_ARGUMENT),
        "enrol without photos": (lambda: client.enroll("x", []),
                                 grpc.StatusCode.INVALID_ARGUMENT),
        "enrol with an inverted window": (
            lambda: client.enroll("x", [photo], valid_from=2e9, valid_to=1e9),
            grpc.StatusCode.INVALID_ARGUMENT),
        "a photo over its 20 MiB cap": (lambda: client.identify(b"\xff" * (22 * 1024 * 1024)),
                                        grpc.StatusCode.INVALID_ARGUMENT),
        "deadline already passed": (lambda: client.identify(photo, timeout=1e-4),
                                    grpc.StatusCode.DEADLINE_EXCEEDED),
    }
    for name, (call, expected) in cases.items():
        assert _code(call) == expected, name
    with pytest.raises(grpc.RpcError) as info:
        client.identify(b"")
    assert "request_id=" in info.value.details() and "empty" in info.value.details()
    # Still serving, and nothing was enrolled by the failed calls.
    assert client.identify(photo).traveller_id == "obama"
    assert _code(lambda: client.get_traveller("x")) == grpc.StatusCode.NOT_FOUND


# -- observability ------------------------------------------------------------------------

def test_metrics_and_audit_record_decisions_without_biometrics(server, client, enrolled,
                                                               faces_dir):
    client.identify((faces_dir / "biden_2.jpg").read_bytes(), request_id="audit-me")
    port = server.running.metrics_server.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'matcher_decisions_total{decision="MATCH",rpc="Identify"}' in text
    assert "matcher_gallery_size" in text and "matcher_batch_size_count" in text
    audit = server.config.data_dir / "audit.log"
    report = verify_chain(audit)
    assert report.ok and report.count > 0
    records = list(read_records(audit))
    mine = [r for r in records if r["fields"].get("request_id") == "audit-me"]
    assert len(mine) == 1 and mine[0]["kind"] == "decision"
    assert mine[0]["fields"]["traveller_id"] == "biden" and mine[0]["fields"]["lane_id"] == "K-01"
    assert {"enrol", "remove"} <= {r["kind"] for r in records}
    # No field can carry a template: every value is a scalar, and no long float lists.
    for r in records:
        assert all(not isinstance(v, (list, dict)) for v in r["fields"].values())
    assert len(json.dumps(records[-1])) < 2000


# -- load shedding, graceful shutdown, the demo command ----------------------------------

def _identify_request(faces_dir: Path, file: str = "obama_3.jpg") -> pb.IdentifyRequest:
    return pb.IdentifyRequest(probe=pb.Probe(image=(faces_dir / file).read_bytes()))


def test_a_full_queue_answers_resource_exhausted_at_once(tmp_path, pipeline, faces_dir):
    from matcher.service.batching import BatchConfig

    config = server_config(tmp_path, batch=BatchConfig(max_batch=1, max_wait_s=0,
                                                       max_queue=1, workers=1))
    with ServerThread(config, pipeline) as srv, MatcherClient(srv.address, timeout=60) as c:
        request = _identify_request(faces_dir)
        futures = [c.stub.Identify.future(request, timeout=60) for _ in range(12)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        # Shed, not queued: the server is immediately usable again.
        assert c.identify(request.probe.image).reason == "empty_gallery"
        metrics = srv.running.metrics.render().decode()
        assert 'matcher_requests_rejected_total{reason="overload"}' in metrics
        assert 'matcher_requests_rejected_total{reason="overload"} 0.0' not in metrics


def test_graceful_shutdown_finishes_calls_in_flight(tmp_path, pipeline, faces_dir):
    from test_hot_swap import wait_for

    from matcher.service.batching import BatchConfig

    config = server_config(tmp_path, batch=BatchConfig(max_batch=1, max_wait_s=0,
                                                       max_queue=32, workers=1))
    srv = ServerThread(config, pipeline).start()
    try:
        with MatcherClient(srv.address, timeout=60) as c:
            c.enroll("obama", [(faces_dir / "obama_1.jpg").read_bytes()])
            request = _identify_request(faces_dir)
            futures = [c.stub.Identify.future(request, timeout=60) for _ in range(6)]
            engine = srv.running.engine
            wait_for(lambda: engine.batcher.queue_depth >= 3, what="calls queued")
            queued_at_stop = engine.batcher.queue_depth
            srv.call(srv.running.stop(grace=30))
            srv.running = None
            answers, refused = [], []
            for f in futures:
                try:
                    answers.append(f.result())
                except grpc.RpcError as exc:
                    refused.append(exc.code())
            # Every call the server had accepted finishes; only a call still in transit when
            # the server stopped listening may be refused, and only as not served.
            assert len(answers) >= queued_at_stop >= 3
            assert all(a.traveller_id == "obama" for a in answers)
            assert set(refused) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
            with pytest.raises(grpc.RpcError) as info:
                c.stub.Identify(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_the_demo_command_answers_a_real_match(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "matcher.cli", "demo", "--once", "--listen", f"127.0.0.1:{port}",
         "--data", str(tmp_path / "demo"), "--metrics-listen", "off"],
        cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("yaoming.jpg:"))
    fields = line.split()
    assert fields[1] == "MATCH" and fields[2].startswith("demo-player-")
    assert 0.55 <= float(fields[fields.index("score") + 1]) <= 0.75
    assert "gallery v22" in line  # all 22 faces of players.jpg were enrolled


def test_client_commands_identify_verify_enroll_and_lane(server, client, enrolled, faces_dir,
                                                         capsys):
    from matcher.cli import main

    address = ["--server", server.address]
    obama = str(faces_dir / "obama_4.jpg")
    assert main(["identify", *address, obama]) == 0
    assert capsys.readouterr().out.startswith("obama_4.jpg: MATCH  obama  score ")
    assert main(["verify", *address, "biden", obama]) == 0
    assert "NO_MATCH" in capsys.readouterr().out
    assert main(["enroll", *address, "cli-traveller", str(faces_dir / "alex_lacamoire_2.jpg")]) == 0
    assert "1 template(s) added" in capsys.readouterr().out
    assert main(["identify", *address, str(faces_dir / "group_two_people.jpg"), "--all-faces",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["faces_found"] == 2 and len(record["faces"]) == 2
    assert main(["lane", *address, "--lanes", "3", "--requests", "2", obama,
                 str(faces_dir / "biden_2.jpg")]) == 0
    out = capsys.readouterr().out
    assert "lanes 3  answered 6  failed 0" in out and "p50" in out and "p99" in out
    assert main(["identify", *address, str(faces_dir / "labels.csv")]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    client.remove("cli-traveller")


def test_lane_simulator_sends_each_kind_of_call_and_keeps_its_timeline(server, enrolled,
                                                                       faces_dir):
    from matcher.lane import run_lanes

    obama = (faces_dir / "obama_4.jpg").read_bytes()
    for rpc in ("identify", "verify", "clear"):
        seen: list[str] = []
        report = run_lanes(server.address, [obama], 2, requests_per_lane=2, rpc=rpc,
                           traveller_ids=["obama"], timeline=True, interval_s=0.01,
                           timeout=60, on_answer=seen.append)
        assert report.answered == 4 and report.failed == 0, (rpc, report.summary())
        assert report.decisions == {"MATCH": 4} and seen == ["MATCH"] * 4
        assert sorted(d for _, _, d in report.timeline) == ["MATCH"] * 4
    with pytest.raises(ValueError, match="one traveller id per image"):
        run_lanes(server.address, [obama], 1, requests_per_lane=1, rpc="verify")
    with pytest.raises(ValueError, match="at least one image"):
        run_lanes(server.address, [], 1, requests_per_lane=1)


def test_request_caps_per_photo_and_per_request(server, client, enrolled, faces_dir):
    """A photo is at most 20 MiB (the decoder says so), a request's photos at most 64 MiB
    in all (the servicer says so), a message a little more (gRPC refuses it unread)."""
    from matcher.face.decode import DEFAULT_LIMITS
    from matcher.transport import MAX_PHOTO_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_PHOTO_BYTES

    assert DEFAULT_LIMITS.max_bytes == MAX_PHOTO_BYTES
    photo = (faces_dir / "obama_4.jpg").read_bytes()

    def padded(size: int) -> bytes:  # the same JPEG, zero bytes after its end
        return photo + b"\x00" * (size - len(photo))

    # Four frames of 15 MiB: far past the old 21 MiB cap, within the request's.
    four = [padded(15 * 2**20)] * 4
    assert client.identify(frames=four).decision == pb.MATCH
    # One photo over its cap: INVALID_ARGUMENT naming it.
    with pytest.raises(grpc.RpcError) as info:
        client.identify(padded(MAX_PHOTO_BYTES + 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 21.0 MB" in info.value.details()
    # Photos that fit one by one but not together: INVALID_ARGUMENT naming the cap.
    over = [padded(MAX_REQUEST_PHOTO_BYTES // 4 + 2**16)] * 4
    for call in (lambda: client.identify(frames=over),
                 lambda: client.enroll("T-CAPS", over)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 64 MiB (each photo at most 20 MiB)" in info.value.details()
    # Past the message cap: gRPC refuses it before it is read, naming its byte limit.
    channel = grpc.insecure_channel(server.address,
                                    options=[("grpc.max_send_message_length", -1)])
    try:
        identify = channel.unary_unary("/matcher.v1.Matcher/Identify",
                                       request_serializer=pb.IdentifyRequest.SerializeToString,
                                       response_deserializer=pb.MatchResponse.FromString)
        huge = pb.IdentifyRequest(frames=[pb.Probe(image=padded(MAX_REQUEST_BYTES // 4))] * 5)
        with pytest.raises(grpc.RpcError) as info:
            identify(huge, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_REQUEST_BYTES) in info.value.details()
    finally:
        channel.close()
