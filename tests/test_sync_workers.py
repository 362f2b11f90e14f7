"""SyncWorkers: plain functions off the loop, results back in batches, and a bound on
how long a blocking call holds up the calls queued behind it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from troth.core.sync_workers import SyncWorkers


def test_results_and_errors_come_back_in_order_on_few_threads() -> None:
    """A thousand quick calls: each result to its caller, errors raised to theirs, in
    the order queued, on one or two threads rather than one per waiting call."""
    workers = SyncWorkers(16, blocked_after=0.5)  # (no call here blocks)
    order: list[int] = []
    threads: set[str] = set()

    def work(i: int) -> int:
        threads.add(threading.current_thread().name)
        order.append(i)
        if i % 100 == 7:
            raise ValueError(i)
        return i * 2

    async def main() -> None:
        futures = [workers.run(lambda i=i: work(i)) for i in range(1000)]  # type: ignore[misc]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 100 == 7:
                assert isinstance(result, ValueError) and result.args == (i,)
            else:
                assert result == i * 2

    asyncio.run(main())
    workers.close()
    assert order == list(range(1000))
    assert len(threads) <= 2  # (an executor wakes a thread per call while one is idle)


def test_a_blocking_call_holds_up_the_queue_only_briefly() -> None:
    """Calls queued behind one that blocks are taken by another worker after about
    ``blocked_after``, not after the blocking call returns."""
    workers = SyncWorkers(4, blocked_after=0.01)

    async def main() -> None:
        blocker = workers.run(lambda: time.sleep(1.0))
        await asyncio.sleep(0.05)  # it runs (and blocks) now
        started = time.monotonic()
        assert await asyncio.gather(*(workers.run(lambda: 1) for _ in range(20))) == [1] * 20
        assert time.monotonic() - started < 0.3
        await blocker

    asyncio.run(main())
    workers.close()


def test_never_more_threads_than_workers() -> None:
    """With every worker blocked, further calls wait for one to return."""
    workers = SyncWorkers(2, blocked_after=0.01)
    names: set[str] = set()

    def nap() -> float:
        names.add(threading.current_thread().name)
        time.sleep(0.3)
        return time.monotonic()

    async def main() -> None:
        started = time.monotonic()
        ends = await asyncio.gather(*(workers.run(nap) for _ in range(4)))
        assert max(ends) - started >= 0.55  # two rounds of two
        assert len(names) == 2

    asyncio.run(main())
    workers.close()


def test_a_cancelled_call_does_not_run_and_close_cancels_the_queue() -> None:
    """A call whose caller gave up before it started is skipped; closing cancels what
    is still queued, and lets the running call finish."""
    workers = SyncWorkers(1, blocked_after=10)
    ran: list[str] = []
    napping = threading.Event()

    def nap() -> None:
        napping.set()
        time.sleep(0.2)

    async def running(call: asyncio.Future[None]) -> asyncio.Future[None]:
        while not napping.is_set():  # the only worker is busy with it
            await asyncio.sleep(0.01)
        napping.clear()
        return call

    async def main() -> None:
        first = await running(workers.run(nap))
        skipped = workers.run(lambda: ran.append("skipped"))
        skipped.cancel()
        after = workers.run(lambda: ran.append("after"))
        await first
        await after
        busy = await running(workers.run(nap))
        queued = workers.run(lambda: ran.append("queued"))
        workers.close()
        await busy
        await asyncio.sleep(0.1)
        assert queued.cancelled()

    asyncio.run(main())
    assert ran == ["after"]


def test_stop_iteration_becomes_an_error_the_caller_can_await() -> None:
    workers = SyncWorkers(1)

    def stop() -> None:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await workers.run(stop)
        assert await workers.run(lambda: "still working") == "still working"

    asyncio.run(main())
    workers.close()
