"""Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM (to the process, as `kill`
sends it) at random moments of a real `pnsfw index`: each stops within seconds with one line, the store stays
readable with its committed rows, and the rerun ends with the rows of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import class_image

from pnsfw.store import Store

IMAGES = 120
RUNS = 12  # 6 of each signal, 2 of them while it commits
SHARD = 4
# Each commit of an interrupted run pauses in the store's commit window (pnsfw.store.hooks), so a run commits
# about one shard a second whatever the machine's speed: the run is still at work when the signal comes, and
# the signal also lands inside commits. The hook is set once pnsfw.store is imported (by a watcher thread),
# so the CLI still installs its signal handlers before pyarrow is imported.
SLOW_COMMITS = """
import sys, threading, time
def install():
    while not hasattr(sys.modules.get("pnsfw.store.hooks"), "set_hook"):
        time.sleep(0.005)
    sys.modules["pnsfw.store.hooks"].set_hook(lambda step: time.sleep(1.0) if step.startswith("commit:") else None)
threading.Thread(target=install, daemon=True).start()
sys.argv = ["pnsfw", *sys.argv[1:]]
from pnsfw.cli import main
main()
"""


def _spawn(source: Path, store: Path, ckpt: Path, slow: bool = False) -> subprocess.Popen:
    entry = ["-c", SLOW_COMMITS] if slow else ["-m", "pnsfw.cli"]
    cmd = [sys.executable, "-X", "faulthandler", *entry, "index", str(source), "--store", str(store),
           "--model", str(ckpt), "--device", "cpu", "--workers", "1", "--batch-size", "4", "--shard-size",
           str(SHARD), "--commit-every", "0.2s", "--no-faiss"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _rows(store: Path) -> list[tuple]:
    table = Store.open(store).table(["id", "uri", "sha256"]).sort_by("id")
    return list(zip(*(table.column(n).to_pylist() for n in table.column_names)))


def _committed(store: Path) -> int:
    try:
        return Store.open(store).rows
    except Exception:
        return 0


def _moment(proc: subprocess.Popen, store: Path, late: bool, rng: random.Random) -> None:
    """Early: during start-up (imports, model load, listing); late: while it commits rows."""
    if late:
        before, deadline = _committed(store), time.monotonic() + 60
        while _committed(store) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        time.sleep(rng.uniform(1.0, 2.5))


def _interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the decode workers get it too
    else:
        proc.send_signal(signum)
    sent = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack, for the failure message
        output, _ = proc.communicate(timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running 10 s after {signal.Signals(signum).name}:\n{output.decode()}") from None
    return proc.returncode, output.decode(), time.monotonic() - sent


def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_completes(tmp_path, tiny_checkpoint):
    source, store = tmp_path / "src", tmp_path / "store"
    source.mkdir()
    for i in range(IMAGES):
        class_image("sfw" if i % 2 else "nsfw", i, (40, 32)).save(source / f"{i:04d}.jpg")
    (source / "0007.jpg").write_bytes(b"\xff\xd8\xff broken")
    rng = random.Random(1234)
    stopped = 0
    for run in range(RUNS):
        signum = signal.SIGINT if run % 2 == 0 else signal.SIGTERM
        proc = _spawn(source, store, tiny_checkpoint, slow=True)
        _moment(proc, store, late=run in (5, RUNS - 1), rng=rng)
        code, output, _ = _interrupt(proc, signum)
        assert "Traceback" not in output, output
        if code == 0:  # it finished before the signal
            assert "indexed" in output
            continue
        assert code in (128 + signum, -signum), (code, output)
        if code == 128 + signum:
            stopped += 1
            assert output.strip().splitlines()[-1].startswith(f"Interrupted by {signal.Signals(signum).name}: ")
            assert len([line for line in output.splitlines() if "Interrupted" in line]) == 1
        if store.exists() and any((store / n).exists() for n in ("manifest.json", "_manifest")):
            _rows(store)  # readable at every stop
    assert stopped >= RUNS // 2, stopped  # most signals land while it works, not before it started
    reference = _spawn(source, tmp_path / "reference", tiny_checkpoint)
    resumed = _spawn(source, store, tiny_checkpoint)
    assert reference.wait(timeout=300) == 0 and resumed.wait(timeout=300) == 0, resumed.stdout.read()
    ref_rows = _rows(tmp_path / "reference")
    assert _rows(store) == ref_rows and len(ref_rows) == IMAGES - 1
    reasons = Store.open(store).errors().column("reason").to_pylist()
    assert reasons == Store.open(tmp_path / "reference").errors().column("reason").to_pylist() and len(reasons) == 1
