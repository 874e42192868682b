"""Why a verdict: the classifier's probabilities plus the nearest labelled training examples."""

from typing import Any

import numpy as np

from ..errors import BadInput
from ..store import Store
from .protocols import Encoder, Scorer
from .query import Searcher, check_k, unit_vectors


def _labelled_index(searcher: Searcher) -> tuple[Any, np.ndarray, list[str]]:
    """An exact index over the training examples' vectors, built once per searcher."""
    import faiss

    if "labelled" not in searcher.cache:
        assert searcher.scorer is not None
        ids, labels = searcher.scorer.labelled_examples()
        rows = searcher.rows_of(ids)
        known = rows >= 0  # rows of a store the model was not trained on are left out
        index = faiss.IndexFlatIP(searcher.dim)
        index.add(np.ascontiguousarray(searcher.vectors_of(ids[known]), dtype=np.float32))
        searcher.cache["labelled"] = (index, ids[known], [l for l, ok in zip(labels, known) if ok])
    return searcher.cache["labelled"]


def verdict(searcher: Searcher, vector: np.ndarray) -> dict[str, Any]:
    """The classifier's verdict (its one shape) for one vector."""
    assert searcher.scorer is not None
    return searcher.scorer.verdicts(vector[None, :])[0]


def explain_vector(searcher: Searcher, vector: np.ndarray, k: int, exclude_id: "int | None" = None) -> dict[str, Any]:
    """The verdict for a vector and its k nearest labelled training examples (`exclude_id`: skip itself)."""
    k = check_k(k)
    if searcher.scorer is None:
        raise BadInput("explain needs a model: open the searcher with a scorer (--model NAME)")
    vector = unit_vectors(vector, searcher.dim)[0]
    result = verdict(searcher, vector)
    index, ids, labels = _labelled_index(searcher)
    sims, pos = index.search(vector[None, :], min(k + 1, index.ntotal)) if index.ntotal else ([[]], [[]])
    chosen = [(int(p), float(s)) for p, s in zip(pos[0], sims[0]) if p >= 0 and ids[p] != exclude_id][:k]
    chosen_ids = ids[[p for p, _ in chosen]]
    rows = searcher.rows_of(chosen_ids)
    uris = searcher.store.uris_of(chosen_ids)
    scores = searcher.p_nsfw_of_rows(rows)
    assert scores is not None
    nsfw_classes = set(searcher.scorer.nsfw_classes)
    neighbours = [{"id": int(ids[p]), "uri": uri, "label": labels[p], "similarity": s, "p_nsfw": float(score),
                   "agrees": (labels[p] in nsfw_classes) == result["nsfw"]}
                  for (p, s), uri, score in zip(chosen, uris, scores)]
    return {"model": searcher.scorer.name, "verdict": result, "neighbours": neighbours,
            "agree": sum(n["agrees"] for n in neighbours), "k": len(neighbours)}


def run_explain(store_root: str, scorer: Scorer, *, item_id: "int | None" = None, image: "str | None" = None,
                k: int = 10, encoder: "Encoder | None" = None) -> dict[str, Any]:
    """`pnsfw explain`: verdict and labelled neighbours for a store id or an image file."""
    k = check_k(k)
    searcher = Searcher.open(Store.open(store_root), scorer)
    if item_id is not None:
        result = explain_vector(searcher, searcher.vector_of(item_id), k, exclude_id=item_id)
        return dict(result, item=searcher.item(item_id))
    if encoder is None:
        raise BadInput("an --image query needs the store's CLIP encoder")
    return dict(explain_vector(searcher, encoder.embed_image_file(str(image)), k), image=image)
