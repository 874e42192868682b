"""Why a verdict: the classifier's probabilities plus the nearest labelled training examples."""

from typing import Any

import numpy as np

from ..errors import BadInput
from ..store import Store
from ..store.projection import l2_normalize
from .query import Searcher, check_k


def labelled_examples(store: Store, name: str) -> tuple[np.ndarray, list[str]]:
    """Ids and labels of model NAME's training split (all labelled rows if it has no split column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..classifier.model import model_paths

    path = model_paths(store, name)["labels"]
    if not path.exists():
        raise BadInput(f"model {name} has no training labels ({path} is missing); retrain it")
    table = pq.read_table(path)
    if "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), "train"))
    return table.column("id").to_numpy(), table.column("label").to_pylist()


def _labelled_index(searcher: Searcher) -> tuple[Any, np.ndarray, list[str]]:
    """An exact index over the training examples' vectors, built once per searcher."""
    import faiss

    if "labelled" not in searcher.cache:
        ids, labels = labelled_examples(searcher.store, searcher.classifier.name)
        rows = searcher.rows_of(ids)
        known = rows >= 0  # rows of a store the model was not trained on are left out
        index = faiss.IndexFlatIP(searcher.dim)
        index.add(np.ascontiguousarray(searcher.vectors()[rows[known]], dtype=np.float32))
        searcher.cache["labelled"] = (index, ids[known], [l for l, ok in zip(labels, known) if ok])
    return searcher.cache["labelled"]


def verdict(searcher: Searcher, vector: np.ndarray) -> dict[str, Any]:
    """The classifier's verdict (its one shape) for one vector."""
    return searcher.classifier.verdicts(vector[None, :])[0]


def explain_vector(searcher: Searcher, vector: np.ndarray, k: int, exclude_id: "int | None" = None) -> dict[str, Any]:
    """The verdict for a vector and its k nearest labelled training examples (`exclude_id`: skip itself)."""
    k = check_k(k)
    if searcher.classifier is None:
        raise BadInput("explain needs a model: open the searcher with model=NAME (--model NAME)")
    vector = l2_normalize(np.asarray(vector, dtype=np.float32).reshape(-1))
    if vector.shape != (searcher.dim,) or not np.isfinite(vector).all():
        raise BadInput(f"the vector must be finite with {searcher.dim} values, got shape {vector.shape}")
    result = verdict(searcher, vector)
    index, ids, labels = _labelled_index(searcher)
    sims, pos = index.search(vector[None, :], min(k + 1, index.ntotal)) if index.ntotal else ([[]], [[]])
    chosen = [(int(p), float(s)) for p, s in zip(pos[0], sims[0]) if p >= 0 and ids[p] != exclude_id][:k]
    rows = searcher.rows_of(ids[[p for p, _ in chosen]])
    uris = searcher.table.column("uri").take(rows).to_pylist() if len(rows) else []
    scores = searcher.p_nsfw_of_rows(rows)
    nsfw_classes = set(searcher.classifier.nsfw_classes)
    neighbours = [{"id": int(ids[p]), "uri": uri, "label": labels[p], "similarity": s, "p_nsfw": float(score),
                   "agrees": (labels[p] in nsfw_classes) == result["nsfw"]}
                  for (p, s), uri, score in zip(chosen, uris, scores)]
    return {"model": searcher.classifier.name, "verdict": result, "neighbours": neighbours,
            "agree": sum(n["agrees"] for n in neighbours), "k": len(neighbours)}


def run_explain(store_root: str, model: str, *, item_id: "int | None" = None, image: "str | None" = None,
                k: int = 10, clip_model: "str | None" = None, device: str = "auto") -> dict[str, Any]:
    """`pnsfw explain`: verdict and labelled neighbours for a store id or an image file."""
    from .embed import query_vector

    k = check_k(k)
    searcher = Searcher.open(Store.open(store_root), model)
    if item_id is not None:
        result = explain_vector(searcher, searcher.vector_of(item_id), k, exclude_id=item_id)
        return dict(result, item=searcher.item(item_id))
    vector = query_vector(searcher.store, image=image, clip_model=clip_model, device=device)
    return dict(explain_vector(searcher, vector, k), image=image)
