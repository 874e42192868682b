"""A folder's files, listed by a child process, in the order of an in-process walk.

Listing a folder takes a GIL round trip per name (os.scandir releases it around each readdir): beside a thread
importing torch, 100k names that list in 0.10-0.12 s alone took 0.78-0.94 s here, 0.48-0.57 s through the child
(2 cores, scripts/bench_listing.py); at 1M files on the GPU machine the walk here lasted the whole 3-4 s import.
A child walks without that contention and hands the names over in NUL-separated blocks, which this process
splits in a few C calls. The walk's rule is written twice, in _CHILD (no pnsfw on the child's path) and
walk_here; tests/test_walk.py holds them to the same paths in the same order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

from ..errors import SourceError

log = logging.getLogger(__name__)

# str names (sorted as this process would sort them), sent as the file system's bytes, one flush per folder
_CHILD = r"""
import os, sys
out = sys.stdout.buffer
for folder, dirs, files in os.walk(sys.argv[1], followlinks=False):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    prefix = os.path.join(folder, "")
    names = [prefix + name for name in sorted(files) if not name.startswith(".")]
    if names:
        out.write(os.fsencode("\0".join(names)) + b"\0")
        out.flush()
"""
_BLOCK = 1 << 20


def walk_here(root: str) -> Iterator[str]:
    """The files under `root` (hidden ones and hidden folders skipped, symlinked folders not followed), sorted
    folder by folder, top down."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        prefix = os.path.join(folder, "")
        files.sort()
        yield from (prefix + name for name in files if not name.startswith("."))


def walk_files(root: str) -> Iterator[str]:
    """`walk_here(root)`'s paths, listed by a child process (here when no child starts)."""
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD, root], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    except OSError as exc:
        log.info("listing %s in this process: no child process started (%s)", root, exc)
        yield from walk_here(root)
        return
    try:
        yield from _names(child, root)
    finally:
        _end(child)


def _names(child: subprocess.Popen[bytes], root: str) -> Iterator[str]:
    assert child.stdout is not None and child.stderr is not None
    rest = b""
    while block := os.read(child.stdout.fileno(), _BLOCK):
        data = rest + block
        cut = data.rfind(b"\0")
        if cut < 0:
            rest = data
            continue
        rest = data[cut + 1:]
        yield from os.fsdecode(data[:cut]).split("\0")
    if child.wait() != 0 or rest:
        lines = child.stderr.read().decode("utf-8", "replace").strip().splitlines()
        raise SourceError(f"listing {root} failed: {lines[-1] if lines else f'exit status {child.returncode}'}")


def _end(child: subprocess.Popen[bytes]) -> None:
    """The child gone and its pipes closed (an abandoned listing kills it)."""
    if child.poll() is None:
        child.kill()
    child.wait()
    for pipe in (child.stdout, child.stderr):
        if pipe is not None:
            pipe.close()
