"""A writer and read replicas as real ``matcher serve`` processes on loopback, lanes driving
them, and faults on a schedule: SIGKILL, SIGSTOP/SIGCONT, SIGTERM drains and restarts on
the same port (the one each server bound at its first start). Used by test_failover.py and
the failover benchmark suite.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _server import METRICS_ANY_PORT, ServerProcess
from service_helpers import Started

from matcher.client import MatcherClient
from matcher.lane import LaneReport, run_lanes


@dataclass
class Member:
    """One server of the cluster: its process and role; its gRPC port stays the same
    across restarts, its metrics port is the one the running process bound."""

    name: str
    role: str
    process: ServerProcess

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def metrics_port(self) -> int:
        return self.process.metrics_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()


class Cluster(Started):
    """``writer`` (demo gallery, one snapshot published) and ``replicas`` read replicas.

    ``replica_args``: extra ``matcher serve`` options per replica (a list of lists) or
    for all (a list). Every server keeps its port across restarts, so a client given the
    addresses once finds a restarted server again.
    """

    def __init__(self, root: Path, replicas: int = 2, *, writer_args: list[str] = (),
                 replica_args: list | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {"OPENBLAS_NUM_THREADS": "1", **(env or {})}
        self.members: list[Member] = []
        self._specs: list[tuple[str, str, list[str]]] = [("writer", "writer", ["--demo",
                                                                                *writer_args])]
        snapshots = root / "writer" / "snapshots"
        for i in range(replicas):
            extra = replica_args or []
            if extra and isinstance(extra[0], list):
                extra = extra[i]
            self._specs.append((f"replica{i + 1}", "replica",
                                ["--replica-of", str(snapshots), "--watch-interval", "0.5",
                                 *extra]))

    @property
    def writer(self) -> Member:
        return self.members[0]

    @property
    def replicas(self) -> list[Member]:
        return self.members[1:]

    @property
    def addresses(self) -> list[str]:
        return [m.address for m in self.members]

    def _process(self, name: str, args: list[str]) -> ServerProcess:
        return ServerProcess(self.root / name, self.root / f"{name}.log",
                             [*args, *METRICS_ANY_PORT, "--grace", "10", "--drain-notice", "1"],
                             env=self.env, keep_port=True)

    def start(self) -> Cluster:
        for i, (name, role, args) in enumerate(self._specs):
            member = Member(name, role, self._process(name, args))
            member.process.start()
            self.members.append(member)
            if i == 0:
                with member.process.client() as client:
                    client.publish_snapshot()
        return self

    def restart(self, member: Member, how: str = "term") -> float:
        """Stop ``member`` (``term``: SIGTERM drain; ``kill``: SIGKILL), start it again on
        the same port, wait until SERVING; returns the seconds it was away."""
        began = time.monotonic()
        if how == "kill":
            member.process.kill()
        else:
            code = member.process.stop(timeout=60)
            if code != 0:
                raise RuntimeError(f"{member.name} exited {code} on SIGTERM:\n"
                                   f"{member.process.log_tail()}")
        member.process.start()
        return time.monotonic() - began

    def signal(self, member: Member, sig: int) -> None:
        os.kill(member.pid, sig)

    def stop(self) -> None:
        for member in self.members:
            if member.alive():
                try:
                    os.kill(member.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            member.process.stop()


@dataclass
class Fault:
    """``action`` run at ``at_s`` seconds into the lane run; ``label`` names it."""

    at_s: float
    label: str
    action: Callable[[], object]
    done_s: float | None = None   # when the action returned (restarts take seconds)


@dataclass
class Run:
    report: LaneReport
    faults: list[Fault]
    hedges: int
    errors: list[str] = field(default_factory=list)   # fault actions that raised


def run_with_faults(addresses: list[str], images: list[bytes], faults: list[Fault], *,
                    lanes: int = 16, interval_s: float = 0.5, deadline_s: float = 2.0,
                    duration_s: float = 16.0, writer: str | None = None,
                    tail_s: float | None = None) -> Run:
    """Drive ``lanes`` paced lanes (one Identify every ``interval_s`` each, deadline
    ``deadline_s``) through one MatcherClient given every address, for ``duration_s``,
    while ``faults`` happen in order on a thread of their own. ``tail_s``: end the lanes
    that long after the last fault is done (``duration_s`` still caps the run)."""
    errors: list[str] = []
    stop = threading.Event()
    client = MatcherClient(addresses, timeout=deadline_s, writer=writer)
    began = threading.Event()
    origin = [0.0]

    def schedule() -> None:
        began.wait()
        for fault in faults:
            pause = origin[0] + fault.at_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                fault.action()
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                errors.append(f"{fault.label}: {type(exc).__name__}: {exc}")
            fault.done_s = time.monotonic() - origin[0]
        if tail_s is not None:
            stop.wait(tail_s)
            stop.set()

    thread = threading.Thread(target=schedule, name="faults", daemon=True)
    thread.start()

    origin[0] = time.monotonic()
    began.set()
    try:
        report = run_lanes(addresses, images, lanes, duration_s=duration_s,
                           interval_s=interval_s, timeout=deadline_s, timeline=True,
                           client=client, stop=stop)
        stop.set()
        thread.join()
        return Run(report, faults, client.hedge.hedges if client.hedge else 0, errors)
    finally:
        client.close()
