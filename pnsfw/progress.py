"""Progress bars for long commands: tqdm on stderr when it is a terminal, nothing (and no tqdm import) otherwise."""

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


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


def counted(items: Iterable[T], enabled: bool, total: "int | None", size: Callable[[T], int],
            unit: str = "rows", desc: str = "") -> Iterator[T]:
    """`items` unchanged, with a bar advanced by size(item) after each; the bar opens on the first item."""
    with progress_bar(enabled, total, unit, desc) as bar:
        for item in items:
            yield item
            bar.update(size(item))
