"""A real matcher server on a loopback port, run on its own event loop in a thread."""
from __future__ import annotations

import asyncio
import csv
import threading
from dataclasses import replace
from pathlib import Path

from matcher.service.server import RunningServer, ServerConfig, start_server
from matcher.v1 import matcher_pb2 as pb


class Started:
    """``with thing:`` starts it and stops it on the way out. A start that fails halfway
    is undone by ``abandon`` (``stop`` unless a subclass knows a surer way) before its
    error goes on. Servers in a thread, in a process, and clusters of them share it."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def abandon(self) -> None:
        self.stop()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.abandon()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerThread(Started):
    """``with ServerThread(config, pipeline) as srv: MatcherClient(srv.address) ...``

    The port is picked by the OS (listen on 127.0.0.1:0) unless the config names one.
    ``wait=False`` returns before models and gallery are loaded (to test UNAVAILABLE).
    """

    def __init__(self, config: ServerConfig, pipeline=None, wait: bool = True,
                 ready_timeout: float = 60.0) -> None:
        self.config = config
        self.pipeline = pipeline
        self.wait = wait
        self.ready_timeout = ready_timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server",
                                       daemon=True)
        self.running: RunningServer | None = None

    def call(self, coro, timeout: float | None = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.running.address

    def start(self) -> ServerThread:
        self.thread.start()
        self.running = self.call(start_server(self.config, self.pipeline))
        if self.wait:
            self.call(self.running.wait_ready(self.ready_timeout))
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self.running is not None:
            self.call(self.running.stop(grace))
            self.running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def server_config(data_dir: Path, **overrides) -> ServerConfig:
    """A loopback server with an OS-picked port and metrics port, everything else default."""
    base = ServerConfig(listen="127.0.0.1:0", data_dir=data_dir,
                        metrics_listen="127.0.0.1:0", watch_interval_s=0.2, grace_s=5.0)
    return replace(base, **overrides)


def read_labels(faces_dir: Path) -> list[dict[str, str]]:
    with open(faces_dir / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def enrolment_plan(faces_dir: Path) -> dict[str, str]:
    """identity -> the file enrolled for it: the first single-face photo of each person
    (sorted by name); every other photo of them is a probe."""
    plan: dict[str, str] = {}
    for row in sorted(read_labels(faces_dir), key=lambda r: r["file"]):
        if row["faces"] == "1":
            plan.setdefault(row["identity"], row["file"])
    return plan


# One minimal call per RPC; any outcome but UNAUTHENTICATED/PERMISSION_DENIED means the
# interceptor let it through (e.g. INVALID_ARGUMENT for an empty Identify).
CALLS = {
    "Identify": lambda s, kw: s.Identify(pb.IdentifyRequest(), **kw),
    "Verify": lambda s, kw: s.Verify(pb.VerifyRequest(), **kw),
    "Clear": lambda s, kw: s.Clear(pb.ClearRequest(), **kw),
    "LaneStream": lambda s, kw: list(s.LaneStream(iter(()), **kw)),
    "Enroll": lambda s, kw: s.Enroll(pb.EnrollRequest(), **kw),
    "EnrollStream": lambda s, kw: list(s.EnrollStream(iter(()), **kw)),
    "Remove": lambda s, kw: s.Remove(pb.RemoveRequest(traveller_id="nobody"), **kw),
    "GetTraveller": lambda s, kw: s.GetTraveller(pb.GetTravellerRequest(traveller_id="x"), **kw),
    "GetGalleryInfo": lambda s, kw: s.GetGalleryInfo(pb.GetGalleryInfoRequest(), **kw),
    "PublishSnapshot": lambda s, kw: s.PublishSnapshot(pb.PublishSnapshotRequest(), **kw),
}
