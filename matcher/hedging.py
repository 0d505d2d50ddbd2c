"""Hedged reads: a second attempt on another server once the first is slower than most.

The "tail at scale" remedy for a server that stalls (a stopped process, a paused VM, a
stuck disk) before its connection is noticed dead: a read still unanswered after twice
the 95th percentile of recent answers is sent again, the first answer wins and the other
attempts are cancelled. A hedge is ``fanout`` (2) attempts sent back to back: the channel's
round robin gives consecutive picks to consecutive servers, so one of the two is not the
stalled server whichever that is (which server an attempt went to is not visible to the
caller, and a single hedge would land on the stalled server as often as not). gRPC's own
``hedgingPolicy`` would do this, but the gRPC core under grpcio parses it and never sends
a hedge (checked with grpcio 1.85: every call waited for its slow server), so the client
hedges here, for reads only (a hedge runs the call twice).

Delay: ``delay_factor`` (2) times the ``quantile`` (0.95) of the last ``window`` answered
attempts' own latencies, measured from each attempt's start, so a stall does not teach
the client to wait longer; at least ``min_delay_s``, at most ``max_delay_fraction`` of
the call's timeout (the hedge needs time to answer too); half the timeout until
``min_samples`` answers are known. The factor keeps hedges for calls that are stuck, not
merely slow: hedging at the quantile itself sends a steady share of all calls twice more,
and when a fault slows every server a little, that extra work slows them further and
hedging feeds on itself (docs/operations.md, "Why twice the p95"). Budget: no new hedge
while more than ``max_hedged_fraction`` (a quarter) of the recent calls were hedged, so a
slow cluster is not sent the work twice over.

A refusal that another server may not repeat (UNAVAILABLE, RESOURCE_EXHAUSTED) starts the
next attempt at once (after ``retry_backoff_s``) when none is in flight; an answer about
the request itself (INVALID_ARGUMENT, NOT_FOUND, ...) ends the call. At most
``max_attempts`` attempts in all, every one within the call's deadline.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

# Refusals by one server that another may not repeat: try elsewhere.
RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Failures of one attempt that another attempt still in flight may not share: wait for it.
# Anything else is an answer about the request and ends the call.
ATTEMPT_FAILURES = RETRY_ELSEWHERE | {grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class HedgePolicy:
    """When a read is sent again; see the module docstring."""

    max_attempts: int = 5
    fanout: int = 2
    quantile: float = 0.95
    delay_factor: float = 2.0
    min_delay_s: float = 0.02
    max_delay_fraction: float = 0.5
    window: int = 200
    min_samples: int = 20
    max_hedged_fraction: float = 0.25
    retry_backoff_s: float = 0.05

    def __post_init__(self) -> None:
        if min(self.max_attempts, self.fanout, self.window, self.min_samples) < 1 or \
                self.delay_factor < 1.0:
            raise ValueError(f"max_attempts, fanout, window and min_samples must be >= 1 "
                             f"and delay_factor >= 1, got: {self}")
        if not (0.0 < self.quantile < 1.0 and 0.0 < self.max_delay_fraction <= 1.0
                and 0.0 <= self.max_hedged_fraction <= 1.0):
            raise ValueError(f"quantile, max_delay_fraction and max_hedged_fraction must be "
                             f"fractions, got: {self}")


class HedgeDelay:
    """Recent attempt latencies -> how long to wait before hedging. Thread-safe."""

    def __init__(self, policy: HedgePolicy = HedgePolicy()) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=policy.window)
        self._hedged: deque[bool] = deque(maxlen=policy.window)
        self._sorted: list[float] | None = None
        self.hedges = 0     # hedges sent, over the client's life (tests, benchmarks)

    def record(self, seconds: float, hedged: bool) -> None:
        """One answered call: its winning attempt's latency, and whether it was hedged."""
        with self._lock:
            self._latencies.append(max(0.0, float(seconds)))
            self._hedged.append(bool(hedged))
            self._sorted = None

    def delay(self, timeout: float) -> float:
        """Seconds to wait for an attempt before hedging it, for a call of ``timeout``."""
        p = self.policy
        ceiling = max(p.min_delay_s, timeout * p.max_delay_fraction)
        with self._lock:
            if len(self._latencies) < p.min_samples:
                return ceiling
            if self._sorted is None:
                self._sorted = sorted(self._latencies)
            ranked = self._sorted
        value = ranked[min(len(ranked) - 1, math.ceil(p.quantile * len(ranked)) - 1)]
        return min(ceiling, max(p.min_delay_s, p.delay_factor * value))

    def may_hedge(self) -> bool:
        """False while the recent calls were hedged more often than the budget allows."""
        with self._lock:
            if not self._hedged:
                return True
            return sum(self._hedged) < self.policy.max_hedged_fraction * len(self._hedged)

    def count_hedge(self) -> None:
        with self._lock:
            self.hedges += 1


# start(timeout_s, elsewhere) -> a started attempt; ``elsewhere`` is True after a server
# refused with UNAVAILABLE (the client may then pick another set of servers).
StartAttempt = Callable[[float, bool], grpc.Future]


def hedged_call(start: StartAttempt, timeout: float, delays: HedgeDelay):
    """Run one read with hedging; returns its response or raises its grpc.RpcError."""
    policy = delays.policy
    began = time.monotonic()
    deadline = began + timeout
    done: queue.SimpleQueue = queue.SimpleQueue()
    running: dict[grpc.Future, float] = {}     # attempt -> when it started
    attempts, hedged = 0, False

    def launch(elsewhere: bool) -> None:
        nonlocal attempts
        attempts += 1
        now = time.monotonic()
        attempt = start(max(deadline - now, 1e-3), elsewhere)
        running[attempt] = now
        attempt.add_done_callback(done.put)

    launch(False)
    next_hedge = began + delays.delay(timeout)
    try:
        while True:
            now = time.monotonic()
            can_hedge = attempts < policy.max_attempts and next_hedge < deadline
            # Attempts end by themselves at the deadline; the extra second is a safety net.
            wait = next_hedge - now if can_hedge else deadline - now + 1.0
            try:
                attempt = done.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if not can_hedge:
                    raise TimeoutError("no attempt ended by its deadline") from None
                if delays.may_hedge():
                    hedged = True
                    delays.count_hedge()
                    for _ in range(min(policy.fanout, policy.max_attempts - attempts)):
                        launch(False)
                    next_hedge = time.monotonic() + delays.delay(timeout)
                else:
                    next_hedge = math.inf
                continue
            started = running.pop(attempt, None)
            if started is None:  # a cancelled attempt reporting late
                continue
            error = attempt.exception()
            if error is None:
                delays.record(time.monotonic() - started, hedged)
                return attempt.result()
            code = error.code()
            if code not in ATTEMPT_FAILURES:
                raise error
            if running:
                continue
            remaining = deadline - time.monotonic()
            if (code in RETRY_ELSEWHERE and attempts < policy.max_attempts
                    and remaining > policy.retry_backoff_s):
                time.sleep(policy.retry_backoff_s)
                launch(code is grpc.StatusCode.UNAVAILABLE)
                continue
            raise error
    finally:
        for attempt in running:
            attempt.cancel()
