"""A classifier as search and the API use it: verdicts, p_nsfw (bulk scores first), its training labels.

`StoreScorer` fulfils pnsfw.search.protocols.Scorer: cli and api build one and hand it to search, which never
imports this stage.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import BadInput
from ..store import Store
from .model import Classifier, load_classifier, model_paths


class StoreScorer:
    """Classifier NAME of a store, with the bulk scores and the labelled examples it was trained on."""

    def __init__(self, store: Store, classifier: Classifier):
        self.store, self.classifier = store, classifier
        self.name, self.classes, self.nsfw_classes = classifier.name, classifier.classes, classifier.nsfw_classes
        self.threshold, self.meta = classifier.threshold, classifier.meta

    @classmethod
    def open(cls, store: Store, name: str) -> "StoreScorer":
        return cls(store, load_classifier(store, name))

    def p_nsfw(self, vectors: np.ndarray) -> np.ndarray:
        return self.classifier.p_nsfw(np.asarray(vectors, np.float32))

    def verdicts(self, vectors: np.ndarray) -> list[dict[str, Any]]:
        return self.classifier.verdicts(vectors)

    def stored_p_nsfw(self, ids: np.ndarray) -> np.ndarray:
        """p_nsfw from the bulk scores of this model (NaN where an id is not scored by this exact model)."""
        from .scoring import lookup_scores

        return lookup_scores(self.store, self.name, ids)

    def stored_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, p_nsfw) of each bulk-score part of this model, streamed (nothing kept here)."""
        from .scoring import iter_scores

        return iter_scores(self.store, self.name)

    def _labels_table(self) -> Any:
        import pyarrow.parquet as pq

        path = model_paths(self.store, self.name)["labels"]
        return pq.read_table(path) if path.exists() else None

    def training_labels(self) -> dict[int, str]:
        """id -> label of every example the model saw (models/NAME.labels.parquet); empty if it has none."""
        table = self._labels_table()
        if table is None:
            return {}
        return dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))

    def labelled_examples(self) -> tuple[np.ndarray, list[str]]:
        """Ids and labels of the training split (all labelled rows if there is no split column)."""
        import pyarrow.compute as pc

        table = self._labels_table()
        if table is None:
            raise BadInput(f"model {self.name} has no training labels "
                           f"({model_paths(self.store, self.name)['labels']} is missing); retrain it")
        if "split" in table.column_names:
            table = table.filter(pc.equal(table.column("split"), "train"))
        return table.column("id").to_numpy(), table.column("label").to_pylist()
