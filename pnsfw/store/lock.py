"""One writer at a time: an advisory lock on STORE/LOCK that the kernel drops when the process dies."""

import fcntl
import os
from pathlib import Path

from ..errors import StoreLocked


class WriteLock:
    """Exclusive, non-blocking flock; readers never take it."""

    def __init__(self, root: Path, name: str = "LOCK") -> None:
        self.path = Path(root) / name
        self._fd: int | None = None

    def acquire(self) -> "WriteLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            from .fs import write_failure

            raise write_failure(str(self.path.parent), exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(f"store {self.path.parent} is being written by another process (pid {holder}); "
                              "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
