"""MicroBatcher: batches form, queues are bounded, deadlines drop work, failures fail all."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from matcher.errors import DeadlineExpired, InvalidInput, NotReady, Overloaded
from matcher.service.batching import BatchConfig, BatchContractError, MicroBatcher

if TYPE_CHECKING:  # imported where used: the batcher's own tests need no gallery
    from matcher.gallery.primary import PrimaryGallery
    from matcher.service.engine import MatchEngine


class Recorder:
    """A batch function that doubles its inputs and remembers every batch it saw; when
    ``held``, each call waits for ``release()``, to fill the queue deliberately."""

    def __init__(self, held: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event() if held else None
        self.entered = threading.Event()

    def release(self) -> None:
        assert self.gate is not None, "only a held Recorder is released"
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return [2 * x for x in items]


def run(coro):
    return asyncio.run(coro)


def run_on_engine(engine: MatchEngine, gallery: PrimaryGallery,
                  calls: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
    """What ``calls()`` returns, run on the started engine; the engine is then stopped
    and the gallery closed."""
    async def main() -> list[Any]:
        engine.start()
        try:
            return await calls()
        finally:
            await engine.stop()

    try:
        return run(main())
    finally:
        gallery.close()


def one_worker(max_batch: int = 1, max_queue: int = 64) -> BatchConfig:
    """One worker that takes what is queued without waiting for company: a batch holds
    what queued while the worker was busy, so a test decides how batches form."""
    return BatchConfig(max_batch=max_batch, max_wait_s=0, max_queue=max_queue, workers=1)


@asynccontextmanager
async def started(fn: Callable[[list[Any]], list[Any]], config: BatchConfig | None = None,
                  **kwargs: Any) -> AsyncIterator[MicroBatcher]:
    """A started MicroBatcher over ``fn``, stopped (its queued work finished) on the way out."""
    b = MicroBatcher(fn, config or BatchConfig(), **kwargs)
    b.start()
    try:
        yield b
    finally:
        await b.stop()


@asynccontextmanager
async def worker_held(b: MicroBatcher, fn: Recorder, item: int = 0
                      ) -> AsyncIterator[asyncio.Task]:
    """While the block runs the worker is inside ``fn`` (held) with ``item``, so what is
    submitted waits in the queue; on the way out ``fn`` is released and the held item's
    task (the one yielded) has its answer."""
    first = asyncio.create_task(b.submit(item))
    await asyncio.to_thread(fn.entered.wait, 10)
    try:
        yield first
    finally:
        fn.release()
    await first


class SlowRecorder(Recorder):
    """A Recorder whose every batch takes at least COMPUTE_S."""

    COMPUTE_S = 0.02

    def __call__(self, items: list[int]) -> list[int]:
        time.sleep(self.COMPUTE_S)
        return super().__call__(items)


def test_concurrent_requests_share_batches_and_get_their_own_results():
    fn = SlowRecorder()

    async def main():
        async with started(fn, BatchConfig(max_batch=8, max_wait_s=0.05, workers=1)) as b:
            out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        return out

    out = run(main())
    assert [result for result, _ in out] == [2 * i for i in range(20)]
    assert sorted(x for batch in fn.batches for x in batch) == list(range(20))
    assert max(len(batch) for batch in fn.batches) == 8
    assert all(1 <= len(batch) <= 8 for batch in fn.batches)
    # each answer reports the batch it ran in, and how long it queued for it: with one
    # worker, the third batch waited behind two batches' compute
    size_of = {x: len(batch) for batch in fn.batches for x in batch}
    assert [stats.batch_size for _, stats in out] == [size_of[i] for i in range(20)]
    behind = 2 * SlowRecorder.COMPUTE_S * 1e3
    assert min(out[i][1].queue_ms for i in fn.batches[2]) >= behind


def test_a_lone_request_is_served_after_max_wait_without_company():
    fn = Recorder()

    async def main():
        async with started(fn, BatchConfig(max_batch=8, max_wait_s=0.01)) as b:
            out = await b.submit(21)
        return out

    result, stats = run(main())
    assert result == 42 and stats.batch_size == 1 and fn.batches == [[21]]


def test_full_queue_refuses_at_once_with_overloaded():
    fn = Recorder(held=True)

    async def main():
        async with started(fn, one_worker(1, max_queue=2)) as b:
            async with worker_held(b, fn) as first:
                queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
                await asyncio.sleep(0)                # let them enqueue
                with pytest.raises(Overloaded, match="queue is full"):
                    await b.submit(3)
            return await asyncio.gather(first, *queued)

    assert [r for r, _ in run(main())] == [0, 2, 4]


def test_requests_whose_deadline_passed_in_the_queue_are_dropped_before_compute():
    fn = Recorder(held=True)
    expired = []

    async def main():
        async with started(fn, one_worker(4, max_queue=8),
                           on_expired=lambda: expired.append(1)) as b:
            async with worker_held(b, fn):
                doomed = asyncio.create_task(b.submit(7, deadline=time.monotonic() + 0.05))
                alive = asyncio.create_task(b.submit(8, deadline=time.monotonic() + 30))
                await asyncio.sleep(0.1)              # the doomed deadline passes while queued
            with pytest.raises(DeadlineExpired):
                await doomed
            return await alive

    assert run(main())[0] == 16
    assert [7 in batch for batch in fn.batches] == [False] * len(fn.batches)
    assert expired == [1]


def test_a_weighted_request_joins_one_batch_whole_and_counts_its_units():
    """Items standing for several units of work (a probe's frames): gathered up to
    max_batch units, never split, and the cost estimates count units."""
    fn = Recorder(held=True)
    units = []

    async def main():
        async with started(fn, one_worker(4, max_queue=8),
                           on_batch=units.append, weight=lambda item: item) as b:
            async with worker_held(b, fn, 1) as first:  # a batch of [1]
                waiting = [asyncio.create_task(b.submit(w)) for w in (3, 2, 5, 1)]
                await asyncio.sleep(0)
            return await asyncio.gather(first, *waiting)

    out = run(main())
    assert [r for r, _ in out] == [2, 6, 4, 10, 2]
    # 3 + 2 reach 4 units (one more item may take a batch past it); 5 alone is over it.
    assert fn.batches == [[1], [3, 2], [5], [1]]
    assert units == [1, 5, 5, 1]
    assert [stats.batch_size for _, stats in out] == [1, 5, 5, 5, 1]
    with pytest.raises(ValueError):
        run(_submit_weighted(0))


async def _submit_weighted(weight: int):
    async with started(Recorder(), weight=lambda item: item) as b:
        await b.submit(weight)


def test_a_heavier_request_expects_a_longer_wait():
    def slow(items):
        time.sleep(0.02 * len(items))
        return items

    async def main():
        async with started(slow, one_worker(1),
                           weight=lambda item: item) as b:
            await b.submit(2)                         # learns what a unit costs (~10 ms)
            one, eight = b.expected_wait_s(1), b.expected_wait_s(8)
            with pytest.raises(DeadlineExpired, match="shorter than one probe's compute"):
                await b.submit(8, deadline=time.monotonic() + 4 * one)
        return one, eight

    one, eight = run(main())
    assert eight == pytest.approx(8 * one)


def test_a_deadline_already_passed_on_arrival_is_refused():
    async def main():
        async with started(Recorder(), BatchConfig()) as b:
            with pytest.raises(DeadlineExpired):
                await b.submit(1, deadline=time.monotonic() - 1)

    run(main())


def test_every_request_of_a_failed_batch_fails_with_the_error():
    def explode(items):
        raise RuntimeError("model crashed")

    async def main():
        async with started(explode, BatchConfig(max_batch=8, max_wait_s=0.05)) as b:
            out = await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
        return out

    out = run(main())
    assert all(isinstance(e, RuntimeError) and "model crashed" in str(e) for e in out)


def test_a_batch_function_returning_the_wrong_count_fails_the_batch():
    async def main():
        short = BatchConfig(max_batch=8, max_wait_s=0.05)
        async with started(lambda items: items[:-1], short) as b:
            out = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        return out

    assert all(isinstance(e, BatchContractError) for e in run(main()))


def test_an_exception_result_fails_only_its_own_request():
    def picky(items):
        return [InvalidInput("odd") if x % 2 else x for x in items]

    async def main():
        async with started(picky, BatchConfig(max_batch=8, max_wait_s=0.05)) as b:
            out = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        return out

    out = run(main())
    assert out[0][0] == 0 and out[2][0] == 2
    assert isinstance(out[1], InvalidInput) and isinstance(out[3], InvalidInput)


def test_stop_finishes_queued_work_then_refuses():
    fn = Recorder(held=True)

    async def main():
        async with started(fn, one_worker(1, max_queue=8)) as b:
            async with worker_held(b, fn) as first:
                tasks = [first, *(asyncio.create_task(b.submit(i)) for i in (1, 2))]
                stopping = asyncio.create_task(b.stop())
                await asyncio.sleep(0)
                with pytest.raises(NotReady):
                    await b.submit(99)
            await stopping
            return [r for r, _ in await asyncio.gather(*tasks)]

    assert run(main()) == [0, 2, 4]


def test_a_cancelled_request_is_not_computed():
    fn = Recorder(held=True)

    async def main():
        async with started(fn, one_worker(4, max_queue=8)) as b:
            async with worker_held(b, fn):
                gone = asyncio.create_task(b.submit(5))
                await asyncio.sleep(0)
                gone.cancel()
                kept = asyncio.create_task(b.submit(6))
                await asyncio.sleep(0)
            return await kept

    assert run(main())[0] == 12
    assert all(5 not in batch for batch in fn.batches)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        BatchConfig(max_batch=0)
    with pytest.raises(ValueError):
        BatchConfig(max_wait_s=-1)


def test_engine_batches_real_photos_with_the_same_templates_as_one_by_one(pipeline,
                                                                           faces_dir, tmp_path):
    """The real batch function: templates from a batch equal the unbatched pipeline's."""
    from matcher.gallery.primary import PrimaryGallery
    from matcher.service.analysis import ImageJob
    from matcher.service.engine import MatchEngine

    files = ["obama_1.jpg", "biden_2.jpg", "kit_harington_1.jpg", "rose_leslie_1.jpg",
             "alex_lacamoire_1.jpg", "group_two_people.jpg"]
    data = [(faces_dir / f).read_bytes() for f in files]
    gallery = PrimaryGallery.open(tmp_path, pipeline.model_id)
    engine = MatchEngine(pipeline, gallery, BatchConfig(max_batch=8, max_wait_s=0.2, workers=1))
    sizes = []
    engine.batcher._on_batch = sizes.append  # observe batch sizes as the metrics hook does

    out = run_on_engine(engine, gallery, lambda: asyncio.gather(
        *(engine.analyse(ImageJob(d), None) for d in data),
        engine.analyse(ImageJob(b"junk"), None), return_exceptions=True))
    assert isinstance(out[-1], InvalidInput)
    assert max(sizes) > 1
    for d, analysis in zip(data, out[:-1], strict=True):
        alone = sorted(pipeline.analyse_bytes(d), key=lambda f: f.area, reverse=True)
        assert len(alone) == len(analysis.faces)
        np.testing.assert_allclose(analysis.templates, np.stack([f.template for f in alone]),
                                   atol=2e-3)


def test_concurrent_searches_share_one_gallery_call_and_keep_their_own_k(pipeline,
                                                                        faces_dir, tmp_path):
    """The search batcher: one identify_many per batch, each answer cut to its own k."""
    from matcher.gallery.primary import PrimaryGallery
    from matcher.service.engine import MatchEngine

    gallery = PrimaryGallery.open(tmp_path, pipeline.model_id)
    files = ["obama_1.jpg", "biden_2.jpg", "kit_harington_1.jpg", "rose_leslie_1.jpg"]
    templates = {f: pipeline.analyse_bytes((faces_dir / f).read_bytes())[0].template
                 for f in files}
    for i, (f, t) in enumerate(templates.items()):
        gallery.enroll(f, t[None, :], 0, 4e9, [f"{i:064x}"])
    engine = MatchEngine(pipeline, gallery)
    calls = []
    real = engine.decider.identify_many
    engine.decider.identify_many = lambda x, k: calls.append((len(x), k)) or real(x, k)

    out = run_on_engine(engine, gallery, lambda: asyncio.gather(
        *(engine.identify(t[None, :], k)
          for k, t in zip((1, 2, 3, 4), templates.values(), strict=True))))
    for (f, _), k, decisions in zip(templates.items(), (1, 2, 3, 4), out, strict=True):
        assert decisions[0].traveller_id == f and len(decisions[0].candidates) == k
    assert sum(n for n, _ in calls) == 4 and len(calls) < 4  # at least two shared a call


def test_a_request_the_queue_cannot_serve_before_its_deadline_is_refused_at_once():
    def slow(items):
        time.sleep(0.05)
        return items

    async def main():
        async with started(slow, one_worker(1, max_queue=32)) as b:
            await b.submit(0)                        # learns what an item costs (~50 ms)
            cost = b.expected_wait_s()               # one item ahead of nobody
            backlog = [asyncio.create_task(b.submit(i)) for i in range(10)]
            await asyncio.sleep(0)
            assert b.expected_wait_s() >= 5 * cost
            with pytest.raises(Overloaded, match="more than the call's remaining"):
                await b.submit(99, deadline=time.monotonic() + 2 * cost)
            refused_before_the_backlog_ran = sum(t.done() for t in backlog) < len(backlog)
            patient = await b.submit(7, deadline=time.monotonic() + 30)
            await asyncio.gather(*backlog)
        return refused_before_the_backlog_ran, patient

    at_once, patient = run(main())
    assert at_once and patient[0] == 7


def test_a_deadline_shorter_than_the_work_itself_is_deadline_exceeded_not_overload():
    def slow(items):
        time.sleep(0.05)
        return items

    async def main():
        async with started(slow, one_worker(1)) as b:
            await b.submit(0)                        # learns what an item costs (~50 ms)
            cost = b.expected_wait_s()
            with pytest.raises(DeadlineExpired, match="shorter than one probe's compute"):
                await b.submit(1, deadline=time.monotonic() + cost / 2)

    run(main())


def test_a_server_waking_to_a_backlog_drops_the_dead_calls_and_admits_live_ones():
    """A stall (the worker held) while calls queue up and their deadlines pass: when the
    next call comes, the dead ones are failed without work and it is admitted, although
    the queue had been full of them."""
    fn = Recorder(held=True)
    expired = []

    async def main():
        async with started(fn, one_worker(1, max_queue=4),
                           on_expired=lambda: expired.append(1)) as b:
            async with worker_held(b, fn):           # the worker is stuck in item 0
                doomed = [asyncio.create_task(b.submit(i, deadline=time.monotonic() + 0.05))
                          for i in (1, 2, 3, 4)]
                await asyncio.sleep(0.1)             # their deadlines pass; the queue is full
                assert b.queue_depth == 4
                live = asyncio.create_task(b.submit(5, deadline=time.monotonic() + 30))
                # Failed while the worker is still stuck: by the admission of the live call.
                outcomes = await asyncio.gather(*doomed, return_exceptions=True)
                assert all(isinstance(o, DeadlineExpired) for o in outcomes), outcomes
                assert b.queue_depth == 1
            return await live

    assert run(main())[0] == 10
    assert sorted(x for batch in fn.batches for x in batch) == [0, 5]
    assert len(expired) == 4


def test_a_caller_that_leaves_stops_counting_against_the_queue_at_once():
    fn = Recorder(held=True)

    async def main():
        async with started(fn, one_worker(1, max_queue=2)) as b:
            async with worker_held(b, fn):
                left = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
                await asyncio.sleep(0)
                assert b.queue_depth == 2
                for task in left:                    # answered elsewhere: the hedge won
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
                assert b.queue_depth == 0
                admitted = asyncio.create_task(b.submit(3))
                await asyncio.sleep(0)
            return await admitted

    assert run(main())[0] == 6
    assert sorted(x for batch in fn.batches for x in batch) == [0, 3]


def test_a_batch_that_spans_a_stall_moves_the_cost_estimate_only_so_far():
    pause = threading.Event()

    def work(items):
        if pause.is_set():
            time.sleep(0.5)                      # a stall: 50x the usual cost
        else:
            time.sleep(0.01)
        return items

    async def main():
        async with started(work, one_worker(1)) as b:
            for i in range(5):
                await b.submit(i)
            before = b.expected_wait_s()
            pause.set()
            await b.submit(99)
            after = b.expected_wait_s()
        return before, after

    from matcher.service.batching import STALL_FACTOR

    before, after = run(main())
    assert after <= before * (0.8 + 0.2 * STALL_FACTOR) * 1.01
