"""kill -9 a `pnsfw` subprocess inside a commit window (a store hook step), for crash-then-rerun tests."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = """
import sys, time
from pnsfw.store import hooks
step, nth, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = [0]
def hook(name):
    if name.startswith(step):
        seen[0] += 1
        if seen[0] == nth:
            open(marker, "w").write(name)
            time.sleep(600)
hooks.set_hook(hook)
from pnsfw.cli import main
sys.argv = ["pnsfw"] + sys.argv[4:]
main()
"""


def kill_inside(step: str, nth: int, args: list, marker: Path) -> None:
    """Run `pnsfw ARGS` in a subprocess and kill -9 it when it reaches the nth pause at `step`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="torch")
    proc = subprocess.Popen([sys.executable, "-c", KILL_AT, step, str(nth), str(marker), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    out = proc.communicate()[0].decode(errors="replace")
    assert marker.exists(), f"never reached {step} #{nth}: {out[-2000:]}"


RACE = """
import sys
sys.path.insert(0, sys.argv[1])
from test_store_v2 import _rows
from pnsfw.store import Store, StoreWriter, checkpoint
root, commits, tag, every = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if every:
    checkpoint.CHECKPOINT_EVERY = every
for i in range(commits):
    w = StoreWriter(Store(root))
    w.commit(_rows(w, 3, f"{tag}{i}-"), None)
"""


def race_writers(store: Path, tags: str, commits: int, checkpoint_every: int = 0, timeout: float = 180) -> None:
    """One process per character of TAGS, all at once, each committing 3 rows `commits` times to STORE (uris
    TAG<i>-...); every one must finish cleanly."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(ROOT / "tests"), str(store), str(commits), tag,
                               str(checkpoint_every)], env=env) for tag in tags]
    assert all(p.wait(timeout=timeout) == 0 for p in procs)
