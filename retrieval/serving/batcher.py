"""An asyncio micro-batcher: concurrent callers' items are grouped into one call of a batch
function run off the event loop (a thread executor).

A batch closes when it holds `max_batch` items or when its oldest item has waited `max_wait_s`,
whichever comes first. Items that arrive while a batch runs wait for the next one, so under
load batches fill without extra waiting; `max_batch=1` gives an unbatched encoder. At most
`concurrency` batches run at once (1: the forward pass alone uses every core; 2 suits models whose
small forward passes leave cores idle, such as EfficientNet-Lite on a CPU).

A lone client should not pay `max_wait_s` on every call: after `patience` waits in a row that
brought no second item, the batcher stops waiting (it still takes whatever is queued) until it
sees concurrent items again, and probes with a wait every `patience * 2` batches.

A caller that gave up is skipped when its batch is formed: its future is done (cancelled), or the
`alive` callable it submitted with says it no longer waits (its deadline passed); the latter gets
DeadlineExceededError. Its item is never passed to the batch function.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from retrieval.errors import DeadlineExceededError

Alive = Callable[[], bool]  # "does the caller still wait for this?", called on the event loop


def ensure_alive(alive: Alive | None) -> None:
    """Raises DeadlineExceededError when `alive` says the caller no longer waits for its answer."""
    if alive is not None and not alive():
        raise DeadlineExceededError("the request's deadline passed or it was cancelled; its work was dropped")


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        patience: int = 8,
        concurrency: int = 1,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.executor, self.on_batch, self.patience = executor, on_batch, patience
        self._fruitless = 0  # consecutive waits that brought no second item
        self._batches = 0
        self._queue: collections.deque[tuple[Any, asyncio.Future, float, Alive | None]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None  # made on the loop, at first use
        self._running: set[asyncio.Task] = set()

    async def submit(self, item: Any, alive: Alive | None = None) -> Any:
        """The batch function's output for `item` (its exception, if the batch failed);
        DeadlineExceededError if `alive()` is false when its batch is formed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future, loop.time(), alive))
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            # The worker lives only while there is work: nothing to start or stop.
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        while self._queue:
            await self._slots.acquire()  # while every slot is busy, items pile up for the next batch
            wait = self._fruitless < self.patience or self._batches % (2 * self.patience) == 0
            deadline = self._queue[0][2] + (self.max_wait_s if wait else 0.0)
            while len(self._queue) < self.max_batch and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            taken = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            taken = [t for t in taken if self._waited_for(t)]
            if not taken:
                self._slots.release()
                continue
            self._batches += 1
            if len(taken) > 1:
                self._fruitless = 0
            elif wait and self.max_wait_s > 0:
                self._fruitless += 1
            if self.on_batch is not None:
                self.on_batch(len(taken))
            task = loop.create_task(self._run(taken))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    @staticmethod
    def _waited_for(queued: tuple) -> bool:
        """False for a caller that gave up: cancelled, or no longer alive (then told so)."""
        _, future, _, alive = queued
        if future.done():
            return False
        try:
            ensure_alive(alive)
        except DeadlineExceededError as e:
            future.set_exception(e)
            return False
        return True

    async def _run(self, taken: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.executor, self.fn, [t[0] for t in taken])
            if len(outputs) != len(taken):
                raise RuntimeError(f"batch function returned {len(outputs)} outputs for {len(taken)} items")
        except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
            for _, future, _, _ in taken:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future, _, _), out in zip(taken, outputs):
                if not future.done():
                    future.set_result(out)
        finally:
            self._slots.release()
