"""Micro-batching: concurrent requests are queued and run as one batch in a worker thread.

A submitted item goes on a pending list; the flush is scheduled for the next
turn of the event loop, so every request handled in this turn joins. A lone
item waits one short window for company. While the worker thread runs a batch,
new items pile up and form the next one (flushed as soon as the batch is done),
so batches grow with load and the event loop never runs model code. The
handoff costs one executor submit and one thread-safe wake-up per batch, not
per item.
"""

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .metrics import Metrics

BatchFn = Callable[[list[Any]], Sequence[Any]]
Pending = list[tuple[Any, asyncio.Future]]


class MicroBatcher:
    """Runs `fn(items) -> results` (one result or exception instance per item) on batches of submitted items."""

    def __init__(self, name: str, fn: BatchFn, metrics: Metrics, window_s: float = 0.002, max_batch: int = 256):
        self.name, self.fn, self.metrics = name, fn, metrics
        self.window_s, self.max_batch = window_s, max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pnsfw-{name}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: Pending = []
        self._running = self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        pending, self._pending, self._loop = self._pending, [], None
        for _, future in pending:
            future.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: Any) -> Any:
        """Queue one item and wait for its result (its exception is raised here)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = loop.create_future()
        self._pending.append((item, future))
        if not (self._running or self._scheduled):
            self._scheduled = True
            loop.call_soon(self._flush, True)
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run other model work on this batcher's thread, so it never runs beside a batch."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _flush(self, may_wait: bool) -> None:
        """Hand the pending items (up to max_batch) to the worker thread; a lone item first waits a window."""
        self._scheduled = False
        if self._running or not self._pending or self._loop is None:
            return
        if may_wait and len(self._pending) == 1 and self.window_s > 0:
            self._scheduled = True
            self._loop.call_later(self.window_s, self._flush, False)
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
        live = [(item, future) for item, future in batch if not future.done()]  # drop callers that left
        if not live:
            return self._flush(False)
        self._running = True
        started, loop = time.perf_counter(), self._loop
        done = self.executor.submit(self.fn, [item for item, _ in live])
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finish, live, f, started))

    def _finish(self, batch: Pending, done: "Future[Sequence[Any]]", started: float) -> None:
        self._running = False
        try:
            results: Sequence[Any] = done.result()
        except BaseException as exc:  # the whole batch failed (or was cancelled): every caller gets the error
            results = [exc if isinstance(exc, Exception) else RuntimeError(str(exc))] * len(batch)
        self.metrics.batch_size.observe(len(batch), stage=self.name)
        self.metrics.batch_seconds.observe(time.perf_counter() - started, stage=self.name)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._pending and not self._scheduled:  # piled up while this batch ran: they have waited enough
            self._flush(False)
