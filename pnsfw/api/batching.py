"""Micro-batching: concurrent requests are queued and run as one batch in a worker thread.

The collector takes the first queued item; if nothing else is waiting it waits
one short window for company, then drains the queue (up to `max_batch`). While
the worker thread runs a batch, new requests pile up and form the next one, so
batches grow with load and the event loop never runs model code.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from .metrics import Metrics

BatchFn = Callable[[list[Any]], Sequence[Any]]


class MicroBatcher:
    """Runs `fn(items) -> results` (one result or exception instance per item) on batches of submitted items."""

    def __init__(self, name: str, fn: BatchFn, metrics: Metrics, window_s: float = 0.002, max_batch: int = 256):
        self.name, self.fn, self.metrics = name, fn, metrics
        self.window_s, self.max_batch = window_s, max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pnsfw-{name}")
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: Any) -> Any:
        """Queue one item and wait for its result (its exception is raised here)."""
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run other model work on this batcher's thread, so it never runs beside a batch."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _collect(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            if self._queue.empty() and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop requests whose client left
            if live:
                await self._run(live)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        started = time.perf_counter()
        try:
            results = await self.call(self.fn, [item for item, _ in batch])
        except Exception as exc:  # the whole batch failed: every caller gets the error
            results = [exc] * len(batch)
        self.metrics.batch_size.observe(len(batch), stage=self.name)
        self.metrics.batch_seconds.observe(time.perf_counter() - started, stage=self.name)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
