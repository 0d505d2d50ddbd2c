"""A deadline-aware micro-batcher: many concurrent requests -> one model call per batch.

Requests wait in a bounded asyncio queue. A worker takes the first waiting request, then
gathers more until the batch holds ``max_batch`` items or ``max_wait_s`` has passed since
it started gathering, drops the requests whose deadline has already passed (nobody is
waiting for their answer), and runs the batch function in a worker thread: ONNX Runtime
and the native kernels release the GIL, so the event loop keeps accepting calls meanwhile.

The batch function gets a list of inputs and must return a list of the same length; an
item may be an exception instance, which fails only that request (a corrupt image in a
batch of eight must not fail the other seven). If the function raises, or returns the
wrong number of results, every request of the batch fails with that error.

When the queue is full, ``submit`` raises ``Overloaded`` at once: memory stays bounded and
the lane can retry on another replica instead of waiting behind a backlog. So it does when
the queue holds more work than the request's deadline leaves time for (the batcher keeps a
moving average of what one item costs a worker): such a request would only wait, expire
and be dropped, having pushed the requests behind it towards their own deadlines.

What the queue holds is counted live: a request whose caller went away (cancelled, or
answered by another server) leaves the count at once, and before a request is refused the
queued requests whose deadline has passed are failed there and then. A server that wakes
from a stall (a stopped process, a paused VM) to a queue of calls nobody waits for any
more drops them without work and admits the live calls behind them; nor does the stall
teach it that work got slower: one batch's time moves the cost estimate by at most
STALL_FACTOR times its current value.

A request may stand for several items of work (``weight``: the frames of one traveller's
multi-frame probe). Its work is never split: it joins one batch whole, batches are
gathered up to ``max_batch`` units of weight (a request may take the last batch it joins
past that), and the cost estimates count units, not requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import DeadlineExpired, MatcherError, NotReady, Overloaded

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

BatchFn = Callable[[list[In]], Sequence[Out | BaseException]]

# A batch that took longer than this many times the current per-unit estimate counts as
# this many: a process stopped for seconds mid-batch is not a sign that work got slower.
STALL_FACTOR = 4.0


class BatchContractError(MatcherError):
    """The batch function broke its contract (wrong number of results)."""


def detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions.

    A stored exception's traceback holds the frames that made it, and their locals hold
    the inputs (a 20 MB image) and the results list holding the exception itself: a
    reference cycle that keeps all of it alive until a full garbage collection. Requests
    get the message and type; the batcher logs a failed batch's traceback itself.
    """
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


@dataclass(frozen=True)
class BatchConfig:
    """max_batch: units of work per call (items, or their weight); max_wait_s: how long the
    first item waits for company;
    max_queue: waiting requests before RESOURCE_EXHAUSTED; workers: batches in flight
    at once (each in its own thread).

    Defaults: greedy batches of up to 4 and two workers, so one batch decodes while the
    other is in ONNX Runtime; the measurements: docs/service.md#batching-and-threads.
    """

    max_batch: int = 4
    max_wait_s: float = 0.0
    max_queue: int = 64
    workers: int = 2
    # Admit a request with a deadline only if the work ahead of it is expected to take at
    # most this share of its remaining time; the rest is for the stages after the models
    # (search, audit fsync, the answer's trip) and for the estimate's own error.
    admit_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.workers < 1:
            raise ValueError(f"max_batch, max_queue and workers must be >= 1, got: {self}")
        if not 0.0 < self.admit_fraction <= 1.0:
            raise ValueError(f"admit_fraction must be in (0, 1], got: {self.admit_fraction}")
        if not 0.0 <= self.max_wait_s < 10.0:
            raise ValueError(f"max_wait_s must be in [0, 10) seconds, got: {self.max_wait_s}")


@dataclass(eq=False)
class _Request(Generic[In, Out]):
    item: In
    future: asyncio.Future
    deadline: float | None   # time.monotonic() seconds; None: no deadline
    enqueued: float
    weight: int = 1          # units of work (e.g. frames of one probe)
    dropped: bool = False    # failed or abandoned while queued; no longer counted


@dataclass(frozen=True)
class BatchStats:
    """What one request's batch looked like, for timings in the response."""

    queue_ms: float
    batch_size: int          # units of work in the batch (its requests' weights summed)


class MicroBatcher(Generic[In, Out]):
    """``await batcher.submit(item, deadline)`` -> (result, BatchStats).

    Use from one event loop. ``start()`` before the first submit, ``stop()`` at shutdown
    (it lets already queued requests finish first). ``weight(item)``: the units of work an
    item stands for (>= 1; default 1 each); ``on_batch`` is told each batch's units.
    """

    def __init__(self, fn: BatchFn, config: BatchConfig = BatchConfig(), name: str = "batch",
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None,
                 on_expired: Callable[[], None] | None = None,
                 weight: Callable[[In], int] | None = None) -> None:
        self.fn = fn
        self.config = config
        self.name = name
        self._weight = weight
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._on_expired = on_expired
        # Made again by start(): asyncio binds them to the loop that first waits on them.
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._item_cost_s: float | None = None  # moving average of worker time per unit
        self._computing = 0                     # units inside a running batch
        self._queued = 0                        # units of live requests in the queue
        self._pending: set[_Request] = set()    # live requests in the queue

    @property
    def queue_depth(self) -> int:
        """Requests waiting that someone still waits for."""
        return len(self._pending)

    def start(self) -> None:
        if self._workers:
            raise RuntimeError(f"batcher {self.name} is already started")
        # Unbounded: the bound is on live requests (``_pending``), checked in submit, so
        # entries abandoned by their callers never hold a place.
        self._queue = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.config.workers,
                                            thread_name_prefix=f"{self.name}-worker")
        self._workers = [asyncio.create_task(self._work(), name=f"{self.name}-{i}")
                         for i in range(self.config.workers)]
        self._accepting = True

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, then end the workers."""
        self._accepting = False
        await self._queue.join()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: In, deadline: float | None = None) -> tuple[Out, BatchStats]:
        """Queue ``item``; ``deadline`` is a time.monotonic() instant or None.

        Raises Overloaded (queue full), DeadlineExpired (deadline passed before compute),
        NotReady (not started or stopping), or whatever the batch function produced.
        """
        if not self._accepting:
            raise NotReady("the service is starting or shutting down; retry shortly")
        weight = 1 if self._weight is None else self._weight(item)
        if weight < 1:
            raise ValueError(f"{self.name}: an item's weight must be >= 1, got: {weight}")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExpired("the request's deadline had passed when it arrived")
        if deadline is not None and self._item_cost_s is not None:
            remaining = deadline - now
            own_cost = weight * self._item_cost_s
            if remaining < own_cost:  # the caller's deadline, not our queue
                raise DeadlineExpired(f"the call's deadline ({remaining * 1e3:.0f} ms) is "
                                      f"shorter than one probe's compute "
                                      f"(~{own_cost * 1e3:.0f} ms)")
        refusal = self._refusal(weight, deadline, now)
        if refusal is not None:
            self._drop_dead(now)  # only then: the common case costs nothing
            refusal = self._refusal(weight, deadline, now)
            if refusal is not None:
                raise Overloaded(refusal)
        future = asyncio.get_running_loop().create_future()
        req: _Request[In, Out] = _Request(item, future, deadline, now, weight)
        self._queue.put_nowait(req)
        self._pending.add(req)
        self._queued += weight
        self._arrived.set()
        self._report_depth()
        try:
            return await future
        finally:
            if req in self._pending:  # the caller went away while it waited
                self._forget(req)
            # The raised exception's traceback holds this frame: drop the references
            # that lead back to it (future -> exception) and to the input.
            del future, item, req

    def _refusal(self, weight: int, deadline: float | None, now: float) -> str | None:
        """Why a request of ``weight`` units cannot be admitted now (None: it can)."""
        if len(self._pending) >= self.config.max_queue:
            return (f"{self.name} queue is full ({self.config.max_queue} waiting); "
                    "retry later or on another server")
        if deadline is None or self._item_cost_s is None:
            return None
        remaining = deadline - now
        expected = self.expected_wait_s(weight)
        if expected > self.config.admit_fraction * remaining:
            return (f"{self.name} queue holds about {expected * 1e3:.0f} ms of work, more "
                    f"than the call's remaining {remaining * 1e3:.0f} ms allow; retry later "
                    "or elsewhere")
        return None

    def _forget(self, req: _Request) -> None:
        """Stop counting a queued request (its entry is skipped when a worker takes it)."""
        self._pending.discard(req)
        req.dropped = True
        req.item = None  # a 20 MB photo is not kept for a caller that left
        self._queued -= req.weight
        self._report_depth()

    def _drop_dead(self, now: float) -> None:
        """Fail the queued requests whose deadline has passed and forget the abandoned
        ones, so neither counts against the live requests arriving behind them."""
        for req in list(self._pending):
            if req.future.done() or self._expire(req, now):
                self._forget(req)

    def _expire(self, req: _Request, now: float) -> bool:
        """Fail ``req`` with DeadlineExpired (and count it) if its deadline has passed by
        ``now``; whether it did."""
        if req.deadline is None or req.deadline > now:
            return False
        req.future.set_exception(
            DeadlineExpired("the deadline passed while the request was queued"))
        if self._on_expired is not None:
            self._on_expired()
        return True

    def expected_wait_s(self, weight: int = 1) -> float:
        """Roughly how long a request of ``weight`` units queued now waits before and
        during its compute."""
        if self._item_cost_s is None:
            return 0.0
        ahead = self._queued + self._computing + weight
        return ahead * self._item_cost_s / self.config.workers

    # -- worker side ----------------------------------------------------------------

    async def _next_batch(self) -> list[_Request]:
        """At least one request; more until max_batch units or max_wait_s after the first."""
        batch = [self._take(await self._queue.get())]
        units = 0 if batch[0].dropped else batch[0].weight
        started = time.monotonic()
        while units < self.config.max_batch:
            try:
                req = self._take(self._queue.get_nowait())
                batch.append(req)
                if not req.dropped:
                    units += req.weight
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = self.config.max_wait_s - (time.monotonic() - started)
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        self._report_depth()
        return batch

    def _take(self, req: _Request) -> _Request:
        """A request leaves the queue for a batch."""
        if not req.dropped:
            self._pending.discard(req)
            self._queued -= req.weight
        return req

    def _live(self, batch: list[_Request]) -> list[_Request]:
        """Drop requests nobody waits for: deadline passed, or the caller went away."""
        now = time.monotonic()
        live = []
        for req in batch:
            if req.dropped or req.future.done():  # failed already, or the caller left
                continue
            if not self._expire(req, now):
                live.append(req)
        return live

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            try:
                live = self._live(batch)
                if live:
                    await self._run(loop, live)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _run(self, loop: asyncio.AbstractEventLoop, live: list[_Request]) -> None:
        started = time.monotonic()
        units = sum(r.weight for r in live)
        if self._on_batch is not None:
            self._on_batch(units)
        self._computing += units
        try:
            results = await loop.run_in_executor(self._executor, self.fn,
                                                 [r.item for r in live])
            if len(results) != len(live):
                raise BatchContractError(
                    f"{self.name}: batch function returned {len(results)} results "
                    f"for {len(live)} inputs")
        except asyncio.CancelledError:
            for req in live:
                if not req.future.done():
                    req.future.set_exception(NotReady("the server is shutting down"))
            raise
        except Exception as exc:  # every request of a failed batch fails with its error
            log.error("%s: batch of %d failed: %s", self.name, len(live), type(exc).__name__,
                      exc_info=exc)
            error = detached(exc)
            for req in live:
                if not req.future.done():
                    req.future.set_exception(error)
            return
        finally:
            self._computing -= units
        cost = (time.monotonic() - started) / units
        if self._item_cost_s is None:
            self._item_cost_s = cost
        else:
            cost = min(cost, STALL_FACTOR * self._item_cost_s)
            self._item_cost_s = 0.8 * self._item_cost_s + 0.2 * cost
        for req, result in zip(live, results, strict=True):
            if req.future.done():
                continue
            stats = BatchStats((started - req.enqueued) * 1e3, units)
            if isinstance(result, BaseException):
                req.future.set_exception(detached(result))
            else:
                req.future.set_result((result, stats))

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))
