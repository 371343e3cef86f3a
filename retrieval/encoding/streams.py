"""Running a model over a stream of batches in several threads, each with its share of torch's
intra-op threads, so that one thread's serial work (decoding the next batch) overlaps another's
forward pass.

On a small CPU a decoding process beside the encoder stalls it (`features.default_workers`), and
decoding between forward passes leaves the encoder idle for that time. Two streams of one thread
each instead keep both cores on the model: while one stream decodes its batch, the other runs
its forward pass. Lite0 on 2 cores, builder: 108.9 -> 117.0 images/s, against 118.3 for the raw
forward pass on the same batches decoded beforehand, and 125.6 for two raw passes at once
(bench/results/builder.md; an earlier run: 104.8 -> 115.5 against 114.5 and 123.4).
Threads rather than processes: torch and PIL release the GIL in their kernels, and the model is
shared, not copied.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()
_RUNNING = threading.Lock()  # held by the one multi-stream map running in this process


def threaded_map(items: Iterable[T], fn: Callable[[T], R], streams: int) -> Iterator[tuple[T, R]]:
    """Yields (item, fn(item)) for every item, in the input order (so what a caller writes, shards
    say, does not depend on which thread finished first).
    With `streams` > 1, that many threads each take the next item (drawing from `items`, one
    thread at a time: a generator's own work, such as decoding, runs in the thread that draws)
    and run `fn` with torch's intra-op threads divided among them, under the caller's grad and
    inference modes. An exception in `items` or `fn` reaches the caller. A caller that stops
    early stops the threads after their current item when it closes this generator (a `for` loop
    left early does, in CPython; else use `contextlib.closing`). With 1 stream, it is a plain loop
    here. Several streams change torch's process-wide thread count while they run, so only one
    such map may run at a time in a process."""
    assert streams >= 1, f"streams must be at least 1, got {streams}"
    if streams == 1:
        for item in items:
            yield item, fn(item)
        return
    if not _RUNNING.acquire(blocking=False):
        raise RuntimeError(
            "another threaded_map with several streams is running in this process; "
            "torch's thread count is process-wide, so they cannot share it"
        )
    try:
        yield from _threaded_map(items, fn, streams)
    finally:
        _RUNNING.release()


def _threaded_map(items: Iterable[T], fn: Callable[[T], R], streams: int) -> Iterator[tuple[T, R]]:
    iterator, lock, stop, numbers = iter(items), threading.Lock(), threading.Event(), itertools.count()
    results: queue.Queue = queue.Queue()
    # items drawn but not yet yielded: memory stays at a few batches, and a stream that has run
    # ahead of a slow one waits here, while the slow one finishes the item the caller needs next
    ahead = threading.Semaphore(2 * streams)
    caller_threads = torch.get_num_threads()
    threads = max(1, caller_threads // streams)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def stream() -> None:
        torch.set_num_threads(threads)  # this thread's OpenMP team; the count is global too
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                while True:
                    ahead.acquire()
                    if stop.is_set():
                        break
                    with lock:
                        item = next(iterator, _DONE)
                        number = next(numbers)
                    if item is _DONE:
                        break
                    results.put((number, item, fn(item)))
        except BaseException as e:  # handed to the caller, raised there
            results.put(e)
        finally:
            results.put(_DONE)

    workers = [threading.Thread(target=stream, name=f"stream-{i}", daemon=True) for i in range(streams)]
    for w in workers:
        w.start()
    running, finished, next_number = streams, {}, 0
    try:
        while running:
            got = results.get()
            if got is _DONE:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                number, item, result = got
                finished[number] = (item, result)
                while next_number in finished:
                    yield finished.pop(next_number)
                    next_number += 1
                    ahead.release()
        assert not finished, f"items {sorted(finished)} finished but were never yielded"
    finally:
        stop.set()
        for _ in workers:  # wake the streams waiting for room: each sees `stop` and ends
            ahead.release()
        while running:  # wait for each stream to finish its current item
            if results.get() is _DONE:
                running -= 1
        for w in workers:
            w.join()
        torch.set_num_threads(caller_threads)
