"""Where an indexing run's wall time goes: PNSFW_TRACE=1 prints each phase's time since the process started."""

import os
import sys
import threading

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


def mark(phase: str, once: bool = False) -> None:
    """Print `phase` with the time since process start when PNSFW_TRACE is set; `once`: only its first time."""
    if not os.environ.get("PNSFW_TRACE"):
        return
    if once:
        with _lock:
            if phase in _seen:
                return
            _seen.add(phase)
    print(f"[pnsfw trace] {since_process_start():8.2f} s  {phase} ({threading.current_thread().name})",
          file=sys.stderr, flush=True)
