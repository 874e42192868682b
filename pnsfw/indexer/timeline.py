"""Where an indexing run's wall time goes: each phase logged (logger `pnsfw.timeline`, debug level: `pnsfw
--log-level debug index ...`) with its time since the process started."""

import logging
import os
import threading

log = logging.getLogger(__name__)
_seen: set[str] = set()
_lock = threading.Lock()


def since_process_start() -> float:
    """Seconds since this process was started (interpreter start-up and imports included), 10 ms resolution."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def mark(phase: str, once: bool = False, at: float | None = None) -> None:
    """Log `phase` with the time since process start (or `at`, a time taken earlier by since_process_start, when
    the logger was not set up yet); `once`: only its first time."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    if once:
        with _lock:
            if phase in _seen:
                return
            _seen.add(phase)
    when = since_process_start() if at is None else at
    log.debug("%8.2f s  %s (%s)", when, phase, threading.current_thread().name)
