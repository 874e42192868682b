"""One warning per fallback reason (logger `pnsfw`): a degraded path is said once, not once per batch."""

import logging
import threading

log = logging.getLogger("pnsfw")
_said: set[str] = set()
_lock = threading.Lock()


def warn_once(reason: str) -> None:
    """Log `reason` at WARNING the first time it is given in this process."""
    with _lock:
        if reason in _said:
            return
        _said.add(reason)
    log.warning("GPU path: %s", reason)
