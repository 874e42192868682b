"""`pnsfw train --tune`: KerasTuner random search over units, layers, activation, dropout and learning rate."""

import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .train import TrainOptions

ACTIVATION_CHOICES = ("tanh", "gelu")
SEARCH_SPACE: dict[str, Any] = {
    "units": [64, 128, 256, 512], "layers": [1, 2], "activation": list(ACTIVATION_CHOICES),
    "dropout": (0.0, 0.5, 0.1), "lr": (1e-4, 1e-2),
}


def _hyper_from(hp: Any) -> dict[str, Any]:
    low, high, step = SEARCH_SPACE["dropout"]
    return {"units": hp.Choice("units", SEARCH_SPACE["units"]), "layers": hp.Choice("layers", SEARCH_SPACE["layers"]),
            "activation": hp.Choice("activation", SEARCH_SPACE["activation"]),
            "dropout": hp.Float("dropout", low, high, step=step),
            "lr": hp.Float("lr", *SEARCH_SPACE["lr"], sampling="log")}


def tune(data: dict[str, tuple[np.ndarray, np.ndarray]], outputs: int,
         options: "TrainOptions") -> tuple[dict[str, Any], dict[str, Any]]:
    """Best hyper-parameters by validation loss, and a summary of the search."""
    from .backend import import_keras
    from .keras_io import build_model
    from .train import class_weights

    keras = import_keras()
    import keras_tuner

    (x, y), (xv, yv) = data["train"], data["val"]
    has_val = len(xv) > 0
    keras.utils.set_random_seed(options.seed)
    with tempfile.TemporaryDirectory(prefix="pnsfw-tune-") as folder:
        tuner = keras_tuner.RandomSearch(lambda hp: build_model(x.shape[1], outputs, **_hyper_from(hp)),
                                         objective="val_loss" if has_val else "loss", max_trials=options.max_trials,
                                         seed=options.seed, directory=folder, project_name="pnsfw", overwrite=True)
        stop = keras.callbacks.EarlyStopping(monitor="val_loss" if has_val else "loss", patience=options.patience)
        tuner.search(x, y, validation_data=(xv, yv) if has_val else None, epochs=options.epochs,
                     batch_size=options.batch_size, verbose=options.verbose, callbacks=[stop],
                     class_weight=class_weights(y) if options.class_weight else None)
        best = tuner.get_best_hyperparameters(1)[0].values
        trials = len(tuner.oracle.trials)
    hyper = {key: best[key] for key in ("units", "layers", "activation", "dropout", "lr")}
    hyper = {k: (float(v) if isinstance(v, float) else v) for k, v in hyper.items()}
    return hyper, {"trials": trials, "max_trials": options.max_trials, "best": hyper, "space": SEARCH_SPACE}
