"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the folder."""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync(path: Path) -> None:
    """Make a file's bytes, or a folder's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], sync_dir: bool = True) -> None:
    """Call write(tmp_path), then make the file appear at path in one rename. sync_dir=False leaves
    fsyncing the folder (making the rename durable) to the caller, once for many files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read into one reused buffer (no fresh 4 MB bytes object per read)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()
