"""A test hook between the steps of a commit, so tests can kill a writer inside each window.

Production code calls `pause(step)` at every point where a crash must leave a readable store; nothing
happens unless a test has installed a hook (`set_hook`), e.g. one that stops at a chosen step until killed.
"""

from collections.abc import Callable

_HOOK: "Callable[[str], None] | None" = None


def set_hook(hook: "Callable[[str], None] | None") -> None:
    global _HOOK
    _HOOK = hook


def pause(step: str) -> None:
    if _HOOK is not None:
        _HOOK(step)
