"""Typed records of what a store holds: the manifest and the bookkeeping of scores.

JSON in, JSON out: `from_json` refuses a document of the wrong shape with StoreError (a manifest that is
`null`, a list, or lacks `shards` is damage, never "an empty store").
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StoreError
from .projection import space_fingerprint

FORMAT_VERSION = 2
_PART_NUMBER = re.compile(r"^part-(\d+)")


def part_number(name: str) -> int:
    """part-00012[-token].parquet -> 12 (-1 for other names)."""
    match = _PART_NUMBER.match(name)
    return int(match.group(1)) if match else -1


@dataclass
class Space:
    """The embedding space: the encoder (CLIP name, weights fingerprint, ...) and the projection."""

    encoder: dict[str, Any]
    projection: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return space_fingerprint(str(self.encoder["fingerprint"]), str(self.projection["fingerprint"]))

    @property
    def dim(self) -> int:
        return int(self.projection["dim"])


@dataclass
class Part:
    """A committed Parquet file: an error part or a labels part (`reasons`: error rows per reason)."""

    name: str
    rows: int
    sha256: str
    bytes: int
    committed: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Shard:
    """A committed shard of rows with ids min_id..max_id (sequential)."""

    name: str
    rows: int
    min_id: int
    max_id: int
    sha256: str
    bytes: int
    committed: float = 0.0


@dataclass
class Generation:
    """A multi-file artefact (an index, a model) committed as one folder; `info` is a small summary; `uses`:
    folders of earlier generations whose files this one references (an index's segments), kept with it."""

    folder: str
    created: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    uses: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    format: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    space: Space | None = None
    next_id: int = 0
    shards: list[Shard] = field(default_factory=list)
    errors: list[Part] = field(default_factory=list)
    index: Generation | None = None
    models: dict[str, Generation] = field(default_factory=dict)
    labels: list[Part] = field(default_factory=list)
    checkpoint: Any = field(default=None, compare=False, repr=False)  # checkpoint.Checkpoint read with it

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def next_part(self, parts: list[Shard] | list[Part]) -> int:
        return max((part_number(p.name) for p in parts), default=-1) + 1

    def to_json(self) -> dict[str, Any]:
        """The inline (format 2) document: every entry listed (checkpoint.py writes the compact form)."""
        data = asdict(self)
        data.pop("checkpoint")
        return data

    @classmethod
    def from_json(cls, data: Any, where: str, root: str = "STORE") -> Manifest:
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise StoreError(f"{where} is not a pnsfw manifest (no shard list); run `pnsfw repair --store {root}`")
        try:
            space = data.get("space")
            return cls(
                format=int(data.get("format", FORMAT_VERSION)), created=float(data.get("created", 0.0)),
                space=Space(**space) if space else None, next_id=int(data.get("next_id", 0)),
                shards=[Shard(**s) for s in data["shards"]], errors=[Part(**e) for e in data.get("errors", [])],
                index=Generation(**data["index"]) if data.get("index") else None,
                models={k: Generation(**v) for k, v in (data.get("models") or {}).items()},
                labels=[Part(**p) for p in data.get("labels", [])])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise StoreError(f"{where} has a malformed entry ({exc}); run `pnsfw repair --store {root}`") from None


@dataclass
class ScoreState:
    """What scores/NAME/ holds: which model file (fingerprint, precision) scored which shards."""

    model: str
    fingerprint: str
    space: str
    classes: list[str]
    nsfw_classes: list[str]
    threshold: float
    precision: str = "fp32"
    generation: str = ""
    shards: dict[str, str] = field(default_factory=dict)  # shard name -> the shard's sha256 when scored

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ScoreState:
        if not isinstance(data, dict):
            raise StoreError(f"{where} is not a score progress record")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise StoreError(f"{where} is malformed ({exc})") from None
