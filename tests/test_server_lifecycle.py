"""A server stopped at awkward moments: during its load, and under a cancelled LaneStream.

Real servers on loopback ports. What they must leave behind: no file of the data folder
held open by a load that never served, and no work (audit records, metrics) done for the
requests of a stream its lane cancelled.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest
from service_helpers import ServerThread, server_config

from matcher.client import MatcherClient
from matcher.gallery.layout import STORE_FILE
from matcher.gallery.store import Store
from matcher.service.audit import AUDIT_FILE, read_records
from matcher.service.batching import BatchConfig
from matcher.service.server import start_server
from matcher.service.servicer import LANE_STREAM_IN_FLIGHT
from matcher.v1 import matcher_pb2 as pb
from matcher.v1 import matcher_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

# Only a ceiling for a wait that a broken server would never end; nothing is timed.
NEVER_S = 60.0


def _open_files_under(folder: Path) -> list[str]:
    """The files under ``folder`` this process holds open (Linux /proc)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between listing and reading
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


def _wait_until(predicate, what: str) -> None:
    ends = time.monotonic() + NEVER_S
    while not predicate():
        if time.monotonic() > ends:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def test_a_stop_during_the_load_closes_the_store_and_audit_log_it_opened(tmp_path, pipeline):
    data = tmp_path / "writer"
    data.mkdir()
    Store.open(data / STORE_FILE, pipeline.model_id).close()
    # Another connection holds the store's write lock: the load opens the audit log, then
    # waits in the store's open (its schema check writes) until the test lets it through.
    holder = sqlite3.connect(data / STORE_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    config = server_config(data, metrics_listen=None)

    async def stop_while_loading() -> asyncio.Task:
        running = await start_server(config, pipeline)
        ends = time.monotonic() + NEVER_S
        while not (data / AUDIT_FILE).exists():  # the load is past the audit log
            assert time.monotonic() < ends, "the load never opened its audit log"
            await asyncio.sleep(0.02)
        stopping = asyncio.create_task(running.stop(grace=0))
        await asyncio.sleep(0)  # stop() has begun: the load is asked to give up
        holder.execute("ROLLBACK")  # the store opens now, for a server that is stopping
        await stopping
        assert running.gallery is None and running.engine is None
        return running.loading

    # asyncio.run returns once every thread it started (the loader's too) has ended.
    loading = asyncio.run(stop_while_loading())
    holder.close()
    assert loading.cancelled()
    assert _open_files_under(data) == []
    # Nothing holds the store: another writer opens it and writes at once.
    with Store.open(data / STORE_FILE, pipeline.model_id, write_wait_s=0.0) as store:
        assert store.gallery_version == 0


def test_a_cancelled_lane_stream_does_no_more_work(tmp_path, pipeline, faces_dir):
    # One batch of one request at a time, so a cancelled stream leaves one request
    # computing, the stream's other in-flight requests queued, and more requests unread
    # behind them (the stream's reader waits for a free slot).
    config = server_config(tmp_path / "writer",
                           batch=BatchConfig(max_batch=1, workers=1, max_queue=64))
    photo = (faces_dir / "obama_4.jpg").read_bytes()
    with ServerThread(config, pipeline) as srv, \
            MatcherClient(srv.address, timeout=NEVER_S) as client:
        client.enroll("obama", [photo])
        engine = srv.running.engine
        # Hold the model batches at the door: the real pipeline runs them once let in.
        gate, held = threading.Event(), threading.Event()
        run_batch = engine.batcher.fn

        def at_the_gate(jobs):
            held.set()
            gate.wait(NEVER_S)
            return run_batch(jobs)

        engine.batcher.fn = at_the_gate
        lane_open = threading.Event()

        def lane_requests():
            for i in range(LANE_STREAM_IN_FLIGHT + 4):
                yield pb.LaneRequest(identify=pb.IdentifyRequest(
                    probe=pb.Probe(image=photo), request_id=f"gone-{i}", lane_id="L-GONE"))
            lane_open.wait(NEVER_S)  # the lane keeps its stream open, then cancels it

        stub = pb_grpc.MatcherStub(client.channel)
        stream = stub.LaneStream(lane_requests(), timeout=NEVER_S)
        try:
            assert held.wait(NEVER_S), "the first request never reached the models"
            _wait_until(lambda: engine.batcher.queue_depth == LANE_STREAM_IN_FLIGHT - 1,
                        "the stream's other in-flight requests queued")
            stream.cancel()
            # The server forgets the queued requests of the cancelled stream...
            _wait_until(lambda: engine.batcher.queue_depth == 0,
                        "the cancelled stream's queued requests dropped")
        finally:
            lane_open.set()
            gate.set()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        # ...and the one computing is answered to nobody: a request sent afterwards, on
        # the same single worker, is answered once everything before it is done.
        assert pb.Decision.Name(client.identify(photo, request_id="after").decision) == "MATCH"
        engine.batcher.fn = run_batch
        audited = [r["fields"].get("request_id")
                   for r in read_records(srv.config.data_dir / AUDIT_FILE)]
        assert "after" in audited
        assert not [rid for rid in audited if str(rid).startswith("gone-")]
        lane = srv.running.metrics.registry.get_sample_value(
            "matcher_lane_decisions_total", {"lane": "L-GONE", "decision": "MATCH"})
        assert lane is None
