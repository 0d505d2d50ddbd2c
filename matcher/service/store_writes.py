"""Gallery writes from the event loop: run in their own small pool, so a stuck write
holds neither a model worker nor a 1:1 check, and answered by the caller's deadline."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import DeadlineExpired, MatcherError
from .metrics import Metrics


class StoreWrites:
    """The write pool; store failures (a deadline passed included) counted in metrics."""

    def __init__(self, metrics: Metrics, threads: int = 2) -> None:
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="store-write")

    def shutdown(self) -> None:
        # A write stuck in the store gives up within the store's bounded wait.
        self._pool.shutdown(wait=True)

    async def run(self, fn, deadline: float | None, *args):
        """Run a gallery write in the write pool, answering by ``deadline`` at the latest.

        The store waits for its lock only as long as the deadline leaves. If the write is
        still running when the deadline passes (a stalled fsync), the caller gets
        DeadlineExpired: the write is not acknowledged, and a retry is idempotent.
        """
        def run():
            wait_s = None if deadline is None else deadline - time.monotonic()
            if wait_s is not None and wait_s <= 0:
                raise DeadlineExpired("the deadline passed before the store could be written; "
                                      "nothing was written")
            return fn(*args, wait_s=wait_s)

        future = asyncio.get_running_loop().run_in_executor(self._pool, run)
        try:
            if deadline is None:
                return await future
            return await asyncio.wait_for(asyncio.shield(future),
                                          max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            expired = DeadlineExpired("the store did not confirm the write before the "
                                      "deadline; it is not acknowledged (a retry is safe)")
            self.metrics.count_store_failure(expired)
            raise expired from None
        except MatcherError as exc:
            self.metrics.count_store_failure(exc)
            raise
