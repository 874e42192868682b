"""Run `pnsfw` in a subprocess whose stderr is a pseudo-terminal: what a person at a terminal would see."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_CLI = "import sys\nfrom pnsfw.cli import main\nsys.argv = ['pnsfw', *sys.argv[1:]]\nmain()\n"


def on_a_terminal(*args: object, timeout: float = 120) -> tuple[int, str]:
    """`pnsfw ARGS` with stderr on a 100-column pty: (exit code, what the terminal showed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", RUN_CLI, *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=follower, env=env, cwd=REPO)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return process.wait(timeout=timeout), shown.decode(errors="replace")
