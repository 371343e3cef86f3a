"""The asyncio micro-batcher on its own: grouping, order, max batch, errors, lone clients."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from retrieval.serving.batcher import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_grouped_and_answered_in_order():
    sizes, threads = [], set()

    def double(items):
        sizes.append(len(items))
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        return [2 * x for x in items]

    async def main():
        b = MicroBatcher(double, max_batch=4, max_wait_s=0.05)
        return await asyncio.gather(*(b.submit(i) for i in range(10)))

    assert run(main()) == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2]
    assert threading.current_thread().name not in threads  # off the event loop


def test_max_batch_one_is_unbatched():
    sizes = []

    async def main():
        b = MicroBatcher(lambda xs: sizes.append(len(xs)) or xs, max_batch=1, max_wait_s=0.01)
        return await asyncio.gather(*(b.submit(i) for i in range(5)))

    assert run(main()) == list(range(5)) and sizes == [1] * 5


def test_a_failed_batch_fails_its_callers_and_the_batcher_goes_on():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def main():
        b = MicroBatcher(fn, max_batch=8, max_wait_s=0.01)
        results = await asyncio.gather(b.submit("a"), b.submit("bad"), return_exceptions=True)
        return results, await b.submit("later")

    results, later = run(main())
    assert all(isinstance(r, ValueError) for r in results) and later == "later"


def test_a_lone_client_stops_paying_the_wait():
    async def main():
        b = MicroBatcher(lambda xs: xs, max_batch=8, max_wait_s=0.2, patience=2)
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            await b.submit(i)
            times.append(time.perf_counter() - t0)
        return times

    times = run(main())
    assert min(times[:2]) >= 0.19  # waited for company that never came
    assert max(times[2:4]) < 0.15  # then stopped waiting
    assert times[4] >= 0.19  # and probes again now and then (every 2 * patience batches)


def test_cancelled_callers_are_skipped():
    seen = []

    async def main():
        b = MicroBatcher(lambda xs: seen.extend(xs) or xs, max_batch=8, max_wait_s=0.05)
        gone = asyncio.ensure_future(b.submit("gone"))
        kept = asyncio.ensure_future(b.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    assert run(main()) == "kept" and seen == ["kept"]


def test_concurrency_runs_batches_side_by_side():
    def slow(items):
        time.sleep(0.3)
        return items

    async def main(concurrency):
        b = MicroBatcher(slow, max_batch=1, max_wait_s=0, concurrency=concurrency)
        t0 = time.perf_counter()
        assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 1, 2, 3]
        return time.perf_counter() - t0

    assert run(main(1)) >= 1.15
    assert run(main(2)) < 0.9  # two at a time: about 0.6 s


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_s": -1}, {"concurrency": 0}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, **kwargs)
