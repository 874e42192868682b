"""`pnsfw` leaves its process without the interpreter's teardown once a heavy library is loaded (shutdown.py):
the exit code, the output, the non-daemon threads and the atexit handlers are as in a normal exit."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_main(tmp_path: Path, heavy: str, *argv: str) -> subprocess.CompletedProcess:
    """`pnsfw ARGV` through main() in a process that loaded `heavy`, with a non-daemon thread still running
    and an atexit handler registered: each leaves a file when it ran to its end."""
    script = f"""
import atexit, sys, threading, time
import {heavy}
def late():
    time.sleep(0.5)
    open({str(tmp_path / "thread")!r}, "w").write("done")
threading.Thread(target=late).start()
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
sys.argv = ["pnsfw", *{list(argv)!r}]
from pnsfw.cli import main
main()
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)


def ran_to_the_end(tmp_path: Path) -> bool:
    return (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"


@pytest.mark.parametrize(("argv", "code", "out", "err"), [
    (("index", "--help"), 0, "Embed images from SOURCEs", ""),
    (("info", "--store", "no/such/store"), 1, "", "Error: "),
    (("index", "--no-such-option"), 2, "", "No such option"),
])
def test_the_exit_code_and_output_are_kept_and_threads_and_atexit_handlers_run(
        tmp_path: Path, argv: tuple[str, ...], code: int, out: str, err: str) -> None:
    done = run_main(tmp_path, "faiss", *argv)
    assert done.returncode == code, done.stderr
    assert out in done.stdout and err in done.stderr
    assert ran_to_the_end(tmp_path)


def test_after_torch_the_whole_help_arrives_through_a_pipe(tmp_path: Path) -> None:
    done = run_main(tmp_path, "torch", "index", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(subprocess.run(
        [sys.executable, "-m", "pnsfw.cli", "index", "--help"], capture_output=True, text=True, cwd=REPO,
        timeout=60).stdout.rstrip().splitlines()[-1])
    assert ran_to_the_end(tmp_path)


def test_the_cli_alone_loads_no_heavy_library_so_light_commands_exit_as_usual() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys; from pnsfw.shutdown import leaves_early; "
                           "from pnsfw import cli; sys.exit(int(leaves_early()))"], cwd=REPO, timeout=60)
    assert done.returncode == 0


def test_a_thread_pool_still_open_at_the_end_does_not_hold_the_exit(tmp_path: Path) -> None:
    """concurrent.futures' workers are non-daemon threads that stop on the threading module's exit hook (as
    `score` leaves them): the exit must run that hook before it joins them."""
    marker = tmp_path / "pool"
    script = f"""
import sys
from concurrent.futures import ThreadPoolExecutor
import faiss
pool = ThreadPoolExecutor(2)
pool.submit(lambda: open({str(marker)!r}, "w").write("ran")).result()
sys.argv = ["pnsfw", "index", "--help"]
from pnsfw.cli import main
main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and marker.read_text() == "ran", done.stderr


def test_with_debug_logging_the_exit_marks_its_phases_on_the_timeline(tmp_path: Path) -> None:
    done = run_main(tmp_path, "faiss", "--log-level", "debug", "info", "--store", "no/such/store")
    assert done.returncode == 1 and ran_to_the_end(tmp_path)
    lines = [line for line in done.stderr.splitlines() if "leaving:" in line]
    assert [line.split("leaving: ")[1].split(" (")[0] for line in lines] == ["threads ending", "exit handlers"]
