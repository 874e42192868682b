"""Progress bars for long commands: tqdm on stderr when it is a terminal, nothing (and no tqdm import) otherwise."""

from types import TracebackType
from typing import Any


class _Silent:
    """What a disabled bar is: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, kind: "type[BaseException] | None", exc: "BaseException | None",
                 tb: "TracebackType | None") -> None:
        pass


def progress_bar(enabled: bool, total: "int | None" = None, unit: str = "rows", desc: str = "") -> Any:
    """A context-managed bar with .update(n): count, rate (unit/s) and ETA (when total is known)."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", unit_scale=True, desc=desc or None, dynamic_ncols=True,
                smoothing=0.1)
