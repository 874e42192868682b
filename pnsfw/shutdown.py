"""How `pnsfw` leaves its process once a command is done.

After a command that loaded torch (or TensorFlow, or FAISS), the interpreter's own teardown (freeing every
module, then the native libraries' destructors) took 0.56-1.33 s on a 2-core VM for a bare `import torch`, and
1.0-1.7 s after the last commit of every GPU indexing run in rounds 10-11: ~10 % of a 100k-thumbnail run. That
work frees memory the kernel frees anyway, so `leave` does what a normal exit does first (the threads ended as
the interpreter ends them, the atexit handlers run: logging flushed, multiprocessing's children reaped) and then
ends the process.
Nothing committed depends on it: a commit is durable when it returns, and a crash at any instant is safe.
"""

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

HEAVY = ("torch", "tensorflow", "faiss")  # native libraries whose teardown is the slow part
# what the interpreter's exit runs first: the threading module's exit hooks (they tell the workers of
# concurrent.futures' pools to stop; joined without them, those wait for work for good), then every non-daemon
# thread joined. Private to CPython: without it the interpreter exits as usual.
_THREADS_DONE = getattr(threading, "_shutdown", None)


def leaves_early() -> bool:
    """Whether `leave` would skip a slow teardown here: a heavy library is loaded, and the threads can be
    ended as the interpreter ends them."""
    return _THREADS_DONE is not None and any(name in sys.modules for name in HEAVY)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`pnsfw info | head`) or a closed stream: nothing to keep
            pass


def leave(code: int, orderly: bool = True, step: Callable[[str], None] = lambda phase: None) -> NoReturn:
    """End the process now with `code`. `orderly`: first what the interpreter's exit does before its teardown
    (the threads ended, the atexit handlers run); without it only the streams are flushed (a signalled run,
    whose threads may still be inside a native call). `step` is told each phase as it begins (a timeline)."""
    if orderly:
        if _THREADS_DONE is None:  # the threads cannot be ended as the interpreter ends them: it exits
            raise SystemExit(code)
        step("leaving: threads ending")
        _THREADS_DONE()
        step("leaving: exit handlers")
        _flush()
        atexit._run_exitfuncs()
    _flush()
    os._exit(code)
