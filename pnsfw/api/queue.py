"""The review queue: unlabelled items ranked by how much a person's label would teach the model.

Three signals, each in [0, 1], summed: closeness to the threshold; disagreement with the nearest labelled
training examples (explain's agreement); disagreement between the served model and the store's other models.
Only a pool of candidates is scored (the rows nearest the threshold plus an even sample of the rest), so a
request costs O(rows) for the pool choice and O(pool) model work, whatever the store's size.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store.projection import l2_normalize

POOL_MIN, POOL_PER_ITEM, K_AGREE = 2000, 20, 10
NEAR = 0.1  # |p_nsfw - threshold| under this is called "near the threshold"


@dataclass
class Others:
    """The store's other classifiers of the same space (name -> StoreScorer)."""

    models: dict[str, Any]


def pool_rows(p: np.ndarray, threshold: float, exclude: np.ndarray, size: int) -> np.ndarray:
    """Row positions: the unlabelled rows nearest the threshold, plus an even sample of the others."""
    open_rows = np.flatnonzero(~exclude)
    if len(open_rows) <= size:
        return open_rows
    distance = np.abs(p[open_rows] - threshold)
    near = open_rows[np.argpartition(distance, size // 2)[: size // 2]]
    rest = np.setdiff1d(open_rows, near)
    sample = rest[np.linspace(0, len(rest) - 1, size - len(near)).astype(np.int64)] if len(rest) else rest
    return np.union1d(near, sample)


def neighbour_agreement(searcher: Any, nsfw_classes: list[str], vectors: np.ndarray, ids: np.ndarray,
                        nsfw: np.ndarray) -> np.ndarray:
    """(n, 2) agree and k of each vector's K_AGREE nearest labelled training examples (of the served model;
    itself left out)."""
    from ..search.explain import _labelled_index

    index, labelled_ids, labels = _labelled_index(searcher)
    out = np.zeros((len(ids), 2), np.int64)
    if not index.ntotal or not len(ids):
        return out
    label_nsfw = np.array([label in set(nsfw_classes) for label in labels])
    _, pos = index.search(np.ascontiguousarray(l2_normalize(vectors)), min(K_AGREE + 1, index.ntotal))
    for i, row in enumerate(pos):
        row = [p for p in row if p >= 0 and labelled_ids[p] != ids[i]][:K_AGREE]
        out[i] = (int((label_nsfw[row] == nsfw[i]).sum()), len(row))
    return out


def _reasons(p: float, threshold: float, agree: int, k: int, flips: list[str]) -> list[str]:
    reasons = []
    if abs(p - threshold) < NEAR:
        reasons.append(f"near the threshold ({p:.3f} vs {threshold:.3f})")
    if k and agree * 2 < k:
        reasons.append(f"labelled neighbours disagree ({agree} of {k} agree)")
    reasons += [f"model {name} disagrees" for name in flips]
    return reasons


def all_p_nsfw(searcher: Any, clf: Any, chunk: int = 65536) -> np.ndarray:
    """p_nsfw of every row under clf: the searcher's scores for its own model, else computed in chunks."""
    rows = np.arange(searcher.rows)
    if clf is searcher.scorer:
        return searcher.p_nsfw_of_rows(rows)
    vectors = searcher.vectors()
    return np.concatenate([clf.p_nsfw(vectors[a:a + chunk].astype(np.float32)) for a in range(0, len(rows), chunk)])


def build_queue(searcher: Any, clf: Any, others: Others, labelled: set[int], n: int) -> dict[str, Any]:
    """The n unlabelled items to review first under scorer clf, each with verdict, agreement, reasons and
    priority."""
    all_ids = searcher.ids.all_ids()
    p_all = all_p_nsfw(searcher, clf)
    exclude = np.isin(all_ids, np.fromiter(labelled, np.int64, len(labelled)))
    rows = pool_rows(p_all, float(clf.threshold), exclude, max(POOL_MIN, POOL_PER_ITEM * n))
    ids, vectors = all_ids[rows], searcher.vectors()[rows].astype(np.float32)
    verdicts = clf.verdicts(vectors)
    nsfw = np.array([v["nsfw"] for v in verdicts], bool)
    p = np.array([v["p_nsfw"] for v in verdicts])
    agreement = neighbour_agreement(searcher, clf.nsfw_classes, vectors, ids, nsfw)
    spread = max(float(clf.threshold), 1 - float(clf.threshold), 1e-6)
    near = 1 - np.abs(p - clf.threshold) / spread
    disagree = np.where(agreement[:, 1] > 0, 1 - agreement[:, 0] / np.maximum(agreement[:, 1], 1), 0.0)
    other_nsfw = {name: m.p_nsfw(vectors) >= m.threshold for name, m in others.models.items()}
    flips = np.zeros(len(ids)) if not other_nsfw else np.mean([o != nsfw for o in other_nsfw.values()], axis=0)
    priority = near + disagree + flips
    order = np.argsort(-priority, kind="stable")[:n]
    items = [_item(searcher, int(ids[i]), verdicts[i], agreement[i], float(priority[i]),
                   [name for name, o in other_nsfw.items() if o[i] != nsfw[i]]) for i in order]
    return {"model": clf.name, "threshold": float(clf.threshold), "classes": list(clf.classes),
            "nsfw_classes": list(clf.nsfw_classes), "others": sorted(others.models),
            "remaining": int((~exclude).sum()), "labelled": len(labelled), "items": items}


def _item(searcher: Any, item_id: int, verdict: dict[str, Any], agreement: np.ndarray, priority: float,
          flips: list[str]) -> dict[str, Any]:
    meta = searcher.item(item_id)
    agree, k = int(agreement[0]), int(agreement[1])
    return {"id": item_id, "uri": meta["uri"], "thumb": f"/v1/items/{item_id}/thumb",
            "verdict": verdict, "agreement": {"agree": agree, "k": k}, "priority": round(priority, 4),
            "reasons": _reasons(verdict["p_nsfw"], verdict["threshold"], agree, k, flips),
            "metadata": {key: v for key, v in meta.items() if key not in ("p_nsfw",)}}
