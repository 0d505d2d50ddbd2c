"""Client failover pieces without the models: hedged reads against toy gRPC servers (one
that stalls, one that answers), the hedge delay and budget, the writer named when it is
down, and the channel settings the server's keepalive enforcement accepts."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest

from matcher.client import MatcherClient, WriterUnavailable, channel_options, service_config
from matcher.hedging import HedgeDelay, HedgePolicy, hedged_call
from matcher.service.server import SERVER_OPTIONS
from matcher.transport import KEEPALIVE_TIME_MS, LANE_HEALTH_SERVICE, MIN_PING_INTERVAL_MS, SERVICE


class ToyServers:
    """grpc.aio servers on loopback, each answering /t.S/M after ``delays[i]`` seconds
    (None: never, until released) or failing with ``codes[i]``; counts its calls."""

    def __init__(self, behaviours: list[tuple[float | None, grpc.StatusCode | None]]) -> None:
        self.behaviours = behaviours
        self.calls = [0] * len(behaviours)
        self.cancelled = [0] * len(behaviours)
        self.ports: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[grpc.aio.Server] = []
        self.release = None

    def _handler(self, i: int):
        delay, code = self.behaviours[i]

        async def answer(request: bytes, context) -> bytes:
            self.calls[i] += 1
            try:
                if delay is None:
                    await self.release.wait()
                else:
                    await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.cancelled[i] += 1
                raise
            if code is not None:
                await context.abort(code, f"server {i} says {code.name}")
            return f"server {i}".encode()

        return grpc.method_handlers_generic_handler(
            "t.S", {"M": grpc.unary_unary_rpc_method_handler(answer)})

    def __enter__(self) -> ToyServers:
        self.thread.start()

        async def start() -> None:
            self.release = asyncio.Event()
            for i in range(len(self.behaviours)):
                server = grpc.aio.server()
                server.add_generic_rpc_handlers((self._handler(i),))
                self.ports.append(server.add_insecure_port("127.0.0.1:0"))
                await server.start()
                self.servers.append(server)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self.release.set()
            for server in self.servers:
                await server.stop(0)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def channel(self) -> grpc.Channel:
        config = {"loadBalancingConfig": [{"round_robin": {}}]}
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        channel = grpc.insecure_channel(target, options=[
            ("grpc.service_config", json.dumps(config))])
        grpc.channel_ready_future(channel).result(10)
        return channel


def _start(channel: grpc.Channel):
    method = channel.unary_unary("/t.S/M")
    return lambda timeout, elsewhere: method.future(b"", timeout=timeout)


def test_a_read_stuck_on_a_stalled_server_is_answered_by_another():
    with ToyServers([(None, None), (0.0, None)]) as servers, servers.channel() as channel:
        delays = HedgeDelay(HedgePolicy(min_samples=1))
        for _ in range(40):
            delays.record(0.01, hedged=False)   # answers take ~10 ms: hedge at 20 ms
        start = _start(channel)
        for _ in range(6):
            assert hedged_call(start, 10.0, delays) == b"server 1"
        assert servers.calls[0] >= 1            # round robin sent some there first
        assert delays.hedges >= 1
        deadline = time.monotonic() + 10
        while servers.cancelled[0] < servers.calls[0] and time.monotonic() < deadline:
            time.sleep(0.05)                    # the losing attempts are cancelled
        assert servers.cancelled[0] == servers.calls[0]


def test_a_refusal_is_tried_elsewhere_and_an_answer_about_the_request_is_final():
    unavailable = [(0.0, grpc.StatusCode.UNAVAILABLE), (0.0, None)]
    with ToyServers(unavailable) as servers, servers.channel() as channel:
        delays = HedgeDelay()
        start = _start(channel)
        assert all(hedged_call(start, 10.0, delays) == b"server 1" for _ in range(4))
    not_found = [(0.0, grpc.StatusCode.NOT_FOUND), (0.0, grpc.StatusCode.NOT_FOUND)]
    with ToyServers(not_found) as servers, servers.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            hedged_call(_start(channel), 10.0, HedgeDelay())
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert sum(servers.calls) == 1          # not asked twice


def test_every_attempt_ends_by_the_call_deadline():
    with ToyServers([(None, None), (None, None)]) as servers, servers.channel() as channel:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            hedged_call(_start(channel), 0.5, HedgeDelay())
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 5.0
        assert sum(servers.calls) <= HedgePolicy().max_attempts


def test_the_hedge_delay_follows_recent_latencies_within_its_bounds():
    policy = HedgePolicy(min_samples=20, window=100)
    delays = HedgeDelay(policy)
    assert delays.delay(2.0) == pytest.approx(1.0)       # too few answers: half the timeout
    for i in range(100):
        delays.record(0.010 + 0.0001 * i, hedged=False)  # 10..19.9 ms
    assert delays.delay(2.0) == pytest.approx(2 * 0.0194, rel=0.01)   # 2 x p95
    for _ in range(100):
        delays.record(5.0, hedged=False)
    assert delays.delay(2.0) == pytest.approx(1.0)       # never past half the timeout
    assert delays.may_hedge()
    for _ in range(30):
        delays.record(0.01, hedged=True)
    assert not delays.may_hedge()                        # 30 % hedged: over the budget


def test_a_write_while_the_writer_is_down_names_the_writer():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"         # nothing listens there
    with MatcherClient(dead, writer=dead, timeout=3) as client:
        with pytest.raises(WriterUnavailable) as info:
            client.remove("T-0001")
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert dead in info.value.details() and "idempotent" in info.value.details()


def test_channel_settings_agree_with_the_server():
    options = dict(channel_options())
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS >= 2 * MIN_PING_INTERVAL_MS
    server = dict(SERVER_OPTIONS)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_INTERVAL_MS
    assert options["grpc.per_rpc_retry_buffer_size"] >= options["grpc.max_send_message_length"]
    config = service_config()
    assert config["healthCheckConfig"] == {"serviceName": LANE_HEALTH_SERVICE}
    assert "healthCheckConfig" not in service_config(None)
    reads = {n["method"] for n in config["methodConfig"][0]["name"]}
    assert reads == {"Identify", "Verify", "Clear", "GetTraveller", "GetGalleryInfo"}
    assert all(n["service"] == SERVICE for n in config["methodConfig"][0]["name"])
