"""Scaling out: a writer and a read replica on loopback ports, behind client round robin."""
from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2
from service_helpers import ServerThread, enrolment_plan, server_config
from test_hot_swap import wait_for

from matcher.client import MatcherClient
from matcher.face.models import demo_photo
from matcher.lane import run_lanes
from matcher.v1 import matcher_pb2 as pb

pytestmark = pytest.mark.slow


def test_writer_and_replica_behind_round_robin(tmp_path, pipeline, faces_dir):
    writer_dir, replica_dir = tmp_path / "writer", tmp_path / "replica"
    plan = enrolment_plan(faces_dir)
    yao = demo_photo("yaoming.jpg").read_bytes()
    obama = (faces_dir / "obama_2.jpg").read_bytes()
    with ServerThread(server_config(writer_dir), pipeline) as writer, \
            MatcherClient(writer.address, timeout=30) as to_writer:
        for identity, file in plan.items():
            to_writer.enroll(identity, [(faces_dir / file).read_bytes()])
        to_writer.enroll("obama", [(faces_dir / "obama_3.jpg").read_bytes()])  # a second photo
        first = to_writer.publish_snapshot()
        replica_config = server_config(replica_dir, role="replica", watch_interval_s=0.1,
                                       snapshot_source=writer_dir / "snapshots")
        with ServerThread(replica_config, pipeline) as replica, \
                MatcherClient(replica.address, timeout=30) as to_replica, \
                MatcherClient([writer.address, replica.address], timeout=30) as both:
            info = to_replica.gallery_info()
            assert info.role == "replica" and info.snapshot == first.snapshot
            assert info.gallery_version == first.gallery_version
            assert info.travellers == len(plan)
            # Both count the stored templates (obama's two photos count two) and, apart,
            # the index's entries: one fused template per traveller once rebuilt.
            for side in (to_writer, to_replica):
                info = side.gallery_info()
                assert (info.travellers, info.templates, info.index_entries) == \
                    (len(plan), len(plan) + 1, len(plan)), info.role
            assert writer.running.metrics.registry.get_sample_value(
                "matcher_gallery_size") == len(plan) + 1

            # Reads are served by both, spread by gRPC's round robin.
            roles = {both.gallery_info().role for _ in range(8)}
            assert roles == {"writer", "replica"}
            for _ in range(4):
                resp = both.identify(obama)
                assert resp.decision == pb.MATCH and resp.traveller_id == "obama"
            assert to_replica.verify("obama", obama).decision == pb.MATCH
            # both count the traveller's stored templates (the replica holds them fused)
            assert to_replica.get_traveller("obama").templates == 2
            assert to_writer.get_traveller("obama").templates == 2

            # Writes belong to the writer.
            for call in (lambda: to_replica.enroll("yao", [yao]),
                         lambda: to_replica.remove("obama"),
                         lambda: to_replica.publish_snapshot()):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # A new enrolment reaches the replica with the next snapshot, while lanes run.
            to_writer.enroll("yao", [yao])
            assert to_replica.identify(yao).decision == pb.NO_MATCH
            stop = threading.Event()
            result = {}
            lanes = threading.Thread(target=lambda: result.setdefault("report", run_lanes(
                [writer.address, replica.address], [obama], lanes=4, stop=stop, timeout=30)))
            lanes.start()
            try:
                published = to_writer.publish_snapshot()
                wait_for(lambda: to_replica.gallery_info().snapshot == published.snapshot,
                         what="the replica to load the new snapshot")
            finally:
                stop.set()
                lanes.join(60)
            assert result["report"].failed == 0, result["report"].errors
            resp = to_replica.identify(yao)
            assert resp.decision == pb.MATCH and resp.traveller_id == "yao"
            assert resp.gallery_version == published.gallery_version

            # Removal too.
            to_writer.remove("yao")
            removed = to_writer.publish_snapshot()
            wait_for(lambda: to_replica.gallery_info().snapshot == removed.snapshot,
                     what="the removal snapshot")
            assert to_replica.identify(yao).decision == pb.NO_MATCH
            with pytest.raises(grpc.RpcError) as info:
                to_replica.verify("yao", yao)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_replica_without_a_snapshot_is_unavailable_until_one_appears(tmp_path, pipeline,
                                                                        faces_dir):
    snapshots = tmp_path / "writer" / "snapshots"
    config = server_config(tmp_path / "replica", role="replica", watch_interval_s=0.1,
                           snapshot_source=snapshots)
    with ServerThread(config, pipeline, wait=False) as replica, \
            MatcherClient(replica.address, timeout=10) as client:
        assert client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Identify(pb.IdentifyRequest(probe=pb.Probe(image=b"x")), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with ServerThread(server_config(tmp_path / "writer"), pipeline) as writer, \
                MatcherClient(writer.address, timeout=30) as to_writer:
            to_writer.enroll("obama", [(faces_dir / "obama_1.jpg").read_bytes()])
            to_writer.publish_snapshot()
        client.wait_serving(timeout=30)
        resp = client.identify((faces_dir / "obama_4.jpg").read_bytes())
        assert resp.traveller_id == "obama"
