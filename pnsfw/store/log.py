"""A versioned log of JSON documents: the commit protocol of the manifest and of score progress.

Version N is the file FOLDER/NNNNNNNNNN.json, created put-if-absent, never rewritten. Readers take the
newest version that parses; a writer reads version N, applies its change and creates N + 1. If another
writer created N + 1 first, the put fails and the writer re-reads and re-applies its change on top (the
way Delta Lake and Iceberg commit). No lock is needed for correctness; old versions are pruned.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import StoreError
from . import hooks
from .fs import FileSystem

log = logging.getLogger("pnsfw.store")
KEEP_VERSIONS = 20
ATTEMPTS = 50
T = TypeVar("T")


def version_name(version: int) -> str:
    return f"{version:010d}.json"


class VersionLog:
    def __init__(self, fs: FileSystem, folder: str):
        self.fs, self.folder = fs, folder

    def versions(self) -> list[int]:
        """Committed version numbers, ascending."""
        names = (e.name for e in self.fs.list(self.folder) if not e.is_dir)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, version: int) -> Any:
        """The document of one version; ValueError when it does not parse."""
        return json.loads(self.fs.read_bytes(f"{self.folder}/{version_name(version)}"))

    def latest(self) -> tuple[int, Any] | None:
        """(version, document) of the newest version that parses; None when there is none at all.

        Raises StoreError when versions exist but none can be read (damage, not an empty log)."""
        versions = self.versions()
        for version in reversed(versions):
            try:
                return version, self.read(version)
            except FileNotFoundError:
                continue  # pruned between listing and reading: an older one is still a committed state
            except (ValueError, UnicodeDecodeError):
                log.warning("skipping unreadable %s/%s", self.folder, version_name(version))
        if versions:
            raise StoreError(f"no readable version in {self.fs.url(self.folder)} "
                             f"({len(versions)} damaged); run `pnsfw repair --store {self.fs.root}`")
        return None

    def put(self, version: int, document: Any) -> bool:
        data = (json.dumps(document, indent=1, sort_keys=False) + "\n").encode()
        hooks.pause(f"commit:{self.folder}")
        won = self.fs.put_if_absent(f"{self.folder}/{version_name(version)}", data)
        if won:
            hooks.pause(f"committed:{self.folder}")
        return won

    def prune(self, keep: int = KEEP_VERSIONS) -> None:
        """Delete all but the newest `keep` versions (readers fall back to older ones only if newer vanish)."""
        for version in self.versions()[:-keep]:
            self.fs.delete(f"{self.folder}/{version_name(version)}")

    def commit(self, read: Callable[[], tuple[int, T]], change: Callable[[T], Any], what: str) -> tuple[int, T]:
        """Re-read, apply `change` (returns the new document, or None for nothing to do), put N + 1; repeat
        on a lost race. Returns (version, the state that `change` was applied to)."""
        for attempt in range(ATTEMPTS):
            version, state = read()
            document = change(state)
            if document is None:
                return version, state
            if self.put(version + 1, document):
                if (version + 1) % 10 == 0:
                    self.prune()
                return version + 1, state
            log.info("commit of %s lost a race with another writer (attempt %d); retrying on top", what, attempt + 1)
            time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
        raise StoreError(f"could not commit {what} to {self.fs.root}: other writers won {ATTEMPTS} races in a row")
