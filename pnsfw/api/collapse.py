"""Hide duplicates among hits: near-duplicate hits folded into one (the one most similar to the query)."""

from typing import Any

import numpy as np

from ..store.projection import l2_normalize

DEFAULT_SIMILARITY = 0.95  # as `pnsfw dedup --threshold`


def collapse_hits(hits: list[dict[str, Any]], vectors: np.ndarray, similarity: float,
                  keep: int) -> tuple[list[dict[str, Any]], int]:
    """(the first `keep` groups, how many hits were folded into them). Hits come best first; each one joins the
    kept hit it is most similar to when that similarity reaches `similarity`, else it starts a group. A kept hit
    lists its folded ones under `duplicates` (id, similarity to it)."""
    unit = l2_normalize(np.asarray(vectors, np.float32))
    gram = unit @ unit.T
    kept: list[int] = []
    folded: dict[int, list[dict[str, Any]]] = {}
    for i in range(len(hits)):
        if kept:
            best = int(np.argmax(gram[i, kept]))
            if gram[i, kept[best]] >= similarity:
                folded[kept[best]].append({"id": hits[i]["id"], "similarity": float(gram[i, kept[best]])})
                continue
        if len(kept) == keep:  # later hits may still be copies of a kept one: they are counted, not shown
            continue
        kept.append(i)
        folded[i] = []
    groups = [dict(hits[i], duplicates=folded[i]) for i in kept]
    return groups, sum(len(g["duplicates"]) for g in groups)


def collapse_for(searcher: Any, hits: list[dict[str, Any]], similarity: float, keep: int
                 ) -> tuple[list[dict[str, Any]], int]:
    """collapse_hits over the stored vectors of the hits (runs on the vectors batcher's thread)."""
    rows = searcher.rows_of(np.array([h["id"] for h in hits], np.int64))
    vectors = searcher.vectors()[rows.clip(0)] if len(hits) else np.zeros((0, searcher.dim), np.float32)
    return collapse_hits(hits, vectors, similarity, keep)
