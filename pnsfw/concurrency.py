"""One toolkit for bounded, ordered concurrency, used by the indexer, bulk scoring and the GPU path.

- `ProcessPool(n)`: forked worker processes with the executor API (`submit(fn, *args) -> Future`); workers
  ignore SIGINT (the parent decides what an interrupt means), exit when the parent dies, and a worker that
  dies fails every pending task with `WorkerLost` instead of hanging. `close()` never blocks: it kills.
- Thread pools are `concurrent.futures.ThreadPoolExecutor` (same `submit` API).
- `read_ahead(pool, fn, items, ahead)`: (item, future) pairs in input order with at most `ahead` in flight;
  `ordered_map(...)`: their results. `pool=None` runs `fn` inline (lazily, in order).
- `background(items, ahead)`: an iterator advanced on a thread of its own, at most `ahead` items ahead of the
  consumer (a reader that overlaps the stage after it; the iterator's own state stays on one thread).
- `DaemonThreads(n)`: `submit(fn, arg)` on daemon threads nothing joins at exit, for calls that may never
  return (a wedged device call); the caller waits on the future with a timeout.
- `one_blas_thread()`, `quiet_collector()`: a long stream's process settings inside, as they were after (numpy's
  BLAS on one thread; the objects alive on entry out of the cyclic collector's sight): an indexing run's stream,
  a server's lifetime.

A stage's exception reaches the consumer with its own type (the worker's traceback is attached as the
cause, as concurrent.futures does), so a domain error raised in a worker is reported like any other.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from .errors import WorkerLost

T = TypeVar("T")
R = TypeVar("R")
__all__ = ["DaemonThreads", "Executor", "ProcessPool", "Task", "WorkerLost", "background", "cpu_count",
           "one_blas_thread", "ordered_map", "quiet_collector", "read_ahead", "refreeze"]


class Executor(Protocol):
    """What `read_ahead` needs of a pool: ThreadPoolExecutor and ProcessPool both are."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]: ...


def cpu_count() -> int:
    """Cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """The BLAS libraries loaded so far (numpy's) on one thread inside, as they were after. An indexing run's
    GEMMs are per batch (the writer's projection of 64-1024 rows): BLAS's threads then only spin beside torch's
    and the decoders (on 2 cores 1,607-1,978 img/s steady with one thread, 974-1,220 without; docs/benchmarks.md)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency of the package; a bare environment keeps BLAS's own threads
        yield
        return
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        yield


YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation (CPython's default: 700)


@contextmanager
def quiet_collector() -> Iterator[None]:
    """The objects alive on entry (torch's and the model's: millions) frozen out of the cyclic collector's sight
    and its youngest generation collected 14x less often inside, as they were after. Each full collection
    otherwise walked them all with every thread stopped: an H200 indexing 1M thumbnails spent 11.4 s of 58 s
    in 5,000 collections, the longest 0.3 s (round 12's stage stats, docs/benchmarks.md)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(YOUNG_THRESHOLD, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def refreeze(collect: bool = False) -> None:
    """Inside `quiet_collector`: what was made since frozen too (a model loaded late). `collect`: first a full
    collection that sees the frozen objects as well, for those that became garbage (a replaced searcher and its
    Keras model, whose reference cycles only the collector frees: frozen, they would stay for good)."""
    if not gc.get_freeze_count():
        return
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


class Task(Future):
    """A Future with multiprocessing.pool's `get()` spelling (for callers written against Pool.apply_async)."""

    def get(self, timeout: float | None = None) -> Any:
        return self.result(timeout)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (shown as the cause, with --debug)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _portable(exc: BaseException) -> BaseException:
    """exc if it survives pickling (domain errors do), else a RuntimeError with its text; traceback attached."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    exc.remote_traceback = text  # type: ignore[attr-defined]
    return exc


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker the moment its parent dies (a kill -9 of the run), so no worker
    outlives it holding inherited files such as the store's write lock; elsewhere the poll below does it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Redelivery:
    """A stop signal whose handler raised inside a callback Python only reports (a weakref or at-fork
    callback: `Exception ignored in ...`) is sent again from another thread, so the raise is not lost."""

    def __init__(self, handler: Callable[[int, Any], None]):
        self.handler, self.raised = handler, {}  # type: ignore[var-annotated]
        self.previous = sys.unraisablehook

    def __call__(self, signum: int, frame: Any) -> None:
        try:
            self.handler(signum, frame)
        except BaseException as exc:
            self.raised[id(exc)] = signum
            raise

    def unraisable(self, unraisable: Any) -> None:
        signum = self.raised.pop(id(unraisable.exc_value), None)
        if signum is None:
            self.previous(unraisable)
            return
        # later, not at once: a signal sent while this hook runs would raise (and be swallowed) in the hook
        timer = threading.Timer(0.05, signal.raise_signal, (signum,))
        timer.daemon = True
        timer.start()


@contextmanager
def stop_signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGINT/SIGTERM go to `handler` inside the block, then to what they went to before; changes nothing
    outside the main thread, where Python runs no signal handler. What the handler raises is not lost where
    Python swallows it (_Redelivery)."""
    redelivery = _Redelivery(handler)
    try:
        previous = {n: signal.signal(n, redelivery) for n in STOP_SIGNALS}
    except ValueError:
        yield
        return
    sys.unraisablehook = redelivery.unraisable
    try:
        yield
    finally:
        sys.unraisablehook = redelivery.previous
        for number, before in previous.items():
            signal.signal(number, before)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block take effect when it ends (through the handlers it found).

    os.fork() runs at-fork callbacks (logging's lock release among them) whose exceptions Python only prints:
    an interrupt raised there would be lost, leaving the run going and a traceback on the terminal."""
    pending: list[int] = []
    try:
        with stop_signals_handled(lambda signum, frame: pending.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _worker(tasks: Any, results: Any, parent: int, initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's deferring handler: terminate() ends it
    _die_with_parent(parent)
    if initializer is not None:
        initializer()
    while True:
        try:
            task = tasks.get(timeout=0.2)
        except queue.Empty:
            if os.getppid() != parent:
                return  # the parent is gone (kill -9): do not linger
            continue
        if task is None:
            return
        seq, fn, args, kwargs = task
        try:
            reply = (seq, True, fn(*args, **kwargs))
        except BaseException as exc:
            reply = (seq, False, _portable(exc))
        try:
            results.send(reply)
        except Exception as exc:
            results.send((seq, False, _portable(exc)))


PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size; a 64 KiB pipe splits a worker's ~0.8 MB reply into 12 reads,
# each one more wait for the parent's GIL in the one thread that collects every worker's results


def _widen(connection: Any) -> None:
    """Grow a result pipe to PIPE_BYTES where the OS allows it (F_SETPIPE_SZ, Linux); else leave it."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (OSError, ImportError, ValueError):
        pass


class ProcessPool:
    """Forked worker processes with `submit`; see the module docstring."""

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None, name: str = "pnsfw-worker"):
        context = multiprocessing.get_context("fork")
        self.workers = max(1, workers)
        self._tasks = context.Queue()
        self._futures: dict[int, Task] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._closing = False
        self._lost: WorkerLost | None = None
        self._readers: list[Any] = []
        self._processes: list[Any] = []
        with signals_deferred():
            self._fork(context, initializer, name)
        self._collector = threading.Thread(target=self._collect, name=f"{name}-results", daemon=True)
        self._collector.start()

    def _fork(self, context: Any, initializer: Callable[[], None] | None, name: str) -> None:
        for rank in range(self.workers):
            reader, writer = context.Pipe(duplex=False)
            _widen(reader)
            process = context.Process(target=_worker, args=(self._tasks, writer, os.getpid(), initializer),
                                      name=f"{name}-{rank}", daemon=True)
            process.start()
            writer.close()
            self._readers.append(reader)
            self._processes.append(process)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
        future = Task()
        with self._lock:
            if self._lost is not None or self._closing:
                future.set_exception(self._lost or CancelledError("the pool is closed"))
                return future
            seq = next(self._seq)
            self._futures[seq] = future
        self._tasks.put((seq, fn, args, kwargs))
        return future

    def apply_async(self, fn: Callable[..., Any], args: tuple = (), kwds: dict | None = None,
                    callback: Callable[[Any], None] | None = None,
                    error_callback: Callable[[BaseException], None] | None = None) -> Task:
        """multiprocessing.pool.Pool's spelling of submit: `callback(result)` on success, `error_callback(exc)`
        on failure (a cancelled task calls neither)."""
        future = self.submit(fn, *args, **(kwds or {}))

        def done(f: Future) -> None:
            if f.cancelled():
                return
            error = f.exception()
            if error is None and callback is not None:
                callback(f.result())
            elif error is not None and error_callback is not None:
                error_callback(error)

        future.add_done_callback(done)
        return future

    def _collect(self) -> None:
        sentinels = {p.sentinel: p for p in self._processes}
        readers: list[Any] = list(self._readers)
        while not self._closing and readers:
            ready: Any
            for ready in multiprocessing.connection.wait(readers + list(sentinels), timeout=0.5):
                if isinstance(ready, int):
                    self._fail(sentinels.pop(ready))
                    continue
                try:
                    seq, ok, value = ready.recv()
                except (EOFError, OSError):
                    readers.remove(ready)
                    continue
                self._resolve(seq, ok, value)

    def _resolve(self, seq: int, ok: bool, value: Any) -> None:
        with self._lock:
            future = self._futures.pop(seq, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
            return
        if getattr(value, "remote_traceback", None):
            value.__cause__ = RemoteTraceback(value.remote_traceback)
        future.set_exception(value)

    def _fail(self, process: Any) -> None:
        """A worker died: its task is lost, and the shared task queue may be wedged, so fail everything."""
        process.join(timeout=0.1)
        if self._closing:
            return
        lost = WorkerLost(f"worker process {process.name} died (exit code {process.exitcode}); "
                          f"out of memory? the run stopped, committed rows are kept")
        with self._lock:
            self._lost = lost
            pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(lost)

    def close(self) -> None:
        """Stop now: kill the workers (they hold nothing that needs a clean exit) and cancel pending tasks."""
        self._closing = True
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=2)
        self._tasks.cancel_join_thread()  # never wait at exit to flush tasks nobody will read
        self._tasks.close()
        with self._lock:
            pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            future.cancel()
        for reader in self._readers:
            reader.close()

    terminate = close  # multiprocessing.pool.Pool's name

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _inline(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, Future[R]]]:
    for item in items:
        try:
            yield item, _done(fn(item))
        except Exception as exc:
            failed: Future[R] = Future()
            failed.set_exception(exc)
            yield item, failed


def read_ahead(pool: Executor | None, fn: Callable[[T], R], items: Iterable[T],
               ahead: int) -> Iterator[tuple[T, Future[R]]]:
    """(item, future of fn(item)) in input order, at most `ahead` submitted beyond the one being consumed.

    Leaving the loop early cancels what was submitted and not started."""
    if pool is None:
        yield from _inline(fn, items)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    upcoming = iter(items)
    try:
        while True:
            while len(pending) < max(1, ahead) and (item := next(upcoming, _END)) is not _END:
                pending.append((item, pool.submit(fn, item)))
            if not pending:
                return
            yield pending.popleft()
    finally:
        for _, future in pending:
            future.cancel()


_END: Any = object()


def ordered_map(pool: Executor | None, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """fn over items in input order, bounded read-ahead; the first failure is raised with its own type."""
    for _, future in read_ahead(pool, fn, items, ahead):
        yield future.result()


def _feed(items: Iterable[T], out: queue.Queue[tuple[bool, Any]], stop: threading.Event) -> None:
    """Put (True, item) for each item, then (False, None) or (False, exception); stops when told to."""
    try:
        for item in items:
            while not stop.is_set():
                try:
                    out.put((True, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put((False, None))
    except BaseException as exc:
        out.put((False, exc))


def background(items: Iterable[T], ahead: int, name: str = "pnsfw-read-ahead") -> Iterator[T]:
    """items advanced on a thread, at most `ahead` (>= 1) waiting for the consumer; its exception is raised
    here, with its own type. Leaving the loop early stops the thread (at its next item)."""
    out: queue.Queue[tuple[bool, Any]] = queue.Queue(max(1, ahead))
    stop = threading.Event()
    thread = threading.Thread(target=_feed, args=(items, out, stop), name=name, daemon=True)
    thread.start()
    try:
        while True:
            more, value = out.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put, then let it see `stop`
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass


class DaemonThreads:
    """`submit(fn, arg) -> Future` on daemon threads that nothing joins at exit (ThreadPoolExecutor's are joined):
    a thread wedged in a C call (an nvJPEG hardware call that never returns) cannot keep the process alive."""

    def __init__(self, count: int, name: str):
        self.jobs: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, arg, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(arg))
                except BaseException as exc:  # the caller's .result() raises it
                    future.set_exception(exc)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        future: Future = Future()
        self.jobs.put((fn, arg, future))
        return future

    def __enter__(self) -> DaemonThreads:
        return self

    def __exit__(self, *_: Any) -> None:
        for _thread in self.threads:
            self.jobs.put(None)
