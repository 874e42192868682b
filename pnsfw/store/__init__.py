"""The store: the only code that knows paths and formats on disk. Imports no other stage.

Design (DESIGN.md §4):
- A store is a folder or an fsspec URL (s3://bucket/prefix, file://...); `fs.py` gives both the same few
  operations (atomic writes, put-if-absent, listing), so the rest never touches os or boto directly.
- `_manifest/NNNNNNNNNN.json` is the commit log: one immutable file per version, created put-if-absent
  (`link` locally, `If-None-Match: *` on S3). Readers take the newest version that parses. A writer stages
  its files under unique names (part-NNNNN-HOST-PID-RAND.parquet), then creates version N + 1; when a racing
  writer created it first, it re-reads and re-applies its change on top (renumbering its shard's ids when
  another writer took them). A local flock (LOCK) only keeps a second `index` from duplicating work.
- Multi-file artefacts are generations: `index/GEN/{faiss.index,index.json}`, `models/NAME/GEN/NAME.*`,
  current when the manifest points at them. Scores: `scores/NAME/part-*.parquet` (one per shard, same name)
  and the versioned log `scores/NAME/_progress/`, so pandas/duckdb read the folder. Labels: `labels/`.
- A crash leaves the last version; leftovers of dead writers are swept by the next writer (`maintenance`).
  v1 stores (`manifest.json`) are read as they are and migrated on the first write (`legacy.py`).
"""

from .projection import Projection
from .store import Store
from .writer import StoreWriter

__all__ = ["Projection", "Store", "StoreWriter"]
