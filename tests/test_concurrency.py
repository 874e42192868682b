"""The concurrency toolkit: ordered, bounded read-ahead over threads and processes; errors keep their type;
a dead worker fails the run instead of hanging it; a domain error in a worker is one line at the CLI."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pnsfw.concurrency import ProcessPool, background, one_blas_thread, ordered_map, read_ahead
from pnsfw.errors import BadInput, WorkerLost


def _square(x: int) -> int:
    time.sleep(0.001 * (x % 3))  # finish out of order
    return x * x


def _fail_on(x: int) -> int:
    if x == 5:
        raise BadInput(f"item {x} is bad")
    return x


def _die_on(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.parametrize("kind", ["inline", "threads", "processes"])
def test_ordered_and_errors_keep_their_type(kind):
    pools = {"inline": lambda: None, "threads": lambda: ThreadPoolExecutor(3), "processes": lambda: ProcessPool(2)}
    pool = pools[kind]()
    try:
        assert list(ordered_map(pool, _square, range(40), ahead=4)) == [x * x for x in range(40)]
        got = []
        with pytest.raises(BadInput, match="item 5 is bad"):
            for value in ordered_map(pool, _fail_on, range(10), ahead=3):
                got.append(value)
        assert got == [0, 1, 2, 3, 4]  # everything before the failure, in order
    finally:
        if pool is not None:
            pool.shutdown() if kind == "threads" else pool.close()


def test_read_ahead_is_bounded():
    submitted, lock = [], threading.Lock()

    def record(x: int) -> int:
        with lock:
            submitted.append(x)
        return x

    with ThreadPoolExecutor(2) as pool:
        for item, future in read_ahead(pool, record, range(100), ahead=3):
            future.result()
            with lock:
                assert len(submitted) <= item + 4  # the one consumed + 3 ahead
            if item == 10:
                break


def test_a_dead_worker_fails_pending_work_instead_of_hanging():
    pool = ProcessPool(2)
    try:
        with pytest.raises(WorkerLost, match="died"):
            list(ordered_map(pool, _die_on, range(20), ahead=4))
    finally:
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 5


def test_the_remote_traceback_is_the_cause():
    with ProcessPool(1) as pool:
        future = pool.submit(_fail_on, 5)
        with pytest.raises(BadInput) as info:
            future.result(timeout=30)
    assert "_fail_on" in str(info.value.__cause__)


_CLI = """
import click
from pnsfw import cli as cli_module
from pnsfw.concurrency import ProcessPool, ordered_map
from pnsfw.errors import BadInput

def fail(x):
    if x == 2:
        raise BadInput("worker says: item 2 is not acceptable")
    return x

@cli_module.cli.command("probe-workers")
def probe():
    with ProcessPool(2) as pool:
        click.echo(list(ordered_map(pool, fail, range(4), ahead=2)))

cli_module.main()
"""


def test_a_domain_error_in_a_worker_process_is_one_line_at_the_cli():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    plain = subprocess.run([sys.executable, "-c", _CLI, "probe-workers"], capture_output=True, text=True, env=env)
    assert plain.returncode == 1
    assert plain.stderr.strip() == "Error: worker says: item 2 is not acceptable" and plain.stdout == ""
    debug = subprocess.run([sys.executable, "-c", _CLI, "--debug", "probe-workers"], capture_output=True, text=True,
                           env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "in fail" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == "Error: worker says: item 2 is not acceptable"


def test_every_pnsfw_environment_variable_is_documented():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    names = {name for path in (root / "pnsfw").rglob("*.py")
             for name in re.findall(r"\bPNSFW_[A-Z0-9_]+", path.read_text())}
    assert {"PNSFW_STORE", "PNSFW_MODEL", "PNSFW_API_TOKEN"} <= names
    undocumented = sorted(n for n in names if not re.search(rf"`{n}[`=]", readme))
    assert not undocumented, f"not documented in README.md: {undocumented}"


def test_background_keeps_order_bounds_read_ahead_and_raises_the_iterators_error():

    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i
        raise KeyError("reader failed")

    got = []
    with pytest.raises(KeyError, match="reader failed"):
        for item in background(items(), ahead=2):
            time.sleep(0.01)
            assert len(produced) - len(got) <= 4  # queue of 2, one being put, one being handed over
            got.append(item)
    assert got == list(range(10))


def test_background_stops_its_thread_when_the_consumer_leaves():

    def forever():
        i = 0
        while True:
            yield i
            i += 1

    for item in background(forever(), ahead=3, name="pnsfw-test-bg"):
        if item == 5:
            break
    deadline = time.time() + 5
    while any(t.name == "pnsfw-test-bg" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "pnsfw-test-bg" for t in threading.enumerate())


def test_a_stop_signal_during_a_fork_takes_effect_after_it(monkeypatch):
    """A SIGTERM that lands while ProcessPool forks (where an exception would only be printed by an at-fork
    callback and lost) is raised once the workers exist, through the handler that was installed."""
    import multiprocessing
    import os as _os

    from pnsfw import concurrency

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop(signum)

    real_fork = _os.fork

    def fork_under_signal():
        _os.kill(_os.getpid(), signal.SIGTERM)  # delivered at the next bytecode, inside the fork's window
        time.sleep(0.05)
        return real_fork()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(_os, "fork", fork_under_signal)
        with pytest.raises(Stop):
            concurrency.ProcessPool(2)
        assert len(multiprocessing.active_children()) == 2  # raised after the forks, not inside one
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) is handler
        reached = False
        with pytest.raises(Stop), concurrency.signals_deferred():
            _os.kill(_os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            reached = True
        assert reached
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in multiprocessing.active_children():
            child.kill()


WEAKREF_STOP = """
import signal, sys, time, weakref
from pnsfw.concurrency import stop_signals_handled

class Stop(Exception):
    pass

class Thing:
    pass

def handler(signum, frame):
    raise Stop(signum)

def callback(ref):
    signal.raise_signal(signal.SIGTERM)
    sum(i for i in range(1000))  # the handler runs here, inside the callback

try:
    with stop_signals_handled(handler):
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
except Stop:
    print("stopped")
"""


def test_a_stop_raised_inside_a_weakref_callback_is_not_lost():
    """Python only reports an exception raised in a weakref callback (importlib's module locks use one): the
    handler's raise there is sent again, so the block still stops, and nothing is printed. In a process of its
    own: signal handlers belong to the main thread, which a pytest-xdist worker's tests may not run on."""
    done = subprocess.run([sys.executable, "-c", WEAKREF_STOP], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert done.stdout.strip() == "stopped" and done.stderr == "", done.stdout + done.stderr


def test_one_blas_thread_inside_and_the_threads_as_they_were_after() -> None:
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas()
    with one_blas_thread():
        assert blas() and set(blas()) == {1}
    assert blas() == before


def test_quiet_collector_freezes_what_lives_and_restores_the_collector_after_an_error() -> None:
    import gc

    from pnsfw.concurrency import YOUNG_THRESHOLD, quiet_collector

    def seen(thing: object) -> bool:
        return any(o is thing for o in gc.get_objects())

    before, alive = gc.get_threshold(), [[1]]
    with pytest.raises(RuntimeError), quiet_collector():
        assert gc.get_freeze_count() > 0 and not seen(alive)
        assert gc.get_threshold() == (max(YOUNG_THRESHOLD, before[0]), *before[1:])
        cycle: list = []
        cycle.append(cycle)  # made inside: still the collector's
        assert seen(cycle)
        raise RuntimeError("the stage failed")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0 and seen(alive)
