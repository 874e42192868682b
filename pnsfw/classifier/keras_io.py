"""The Keras side of the classifier (training only): build, save, and read a .keras file into plain layers."""

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from .backend import import_keras
from .weights import Layer


def build_model(dim: int, outputs: int, units: int = 256, layers: int = 1, activation: str = "tanh",
                dropout: float = 0.0, lr: float = 1e-3) -> Any:
    """A compiled Keras model; outputs == 1 means binary (sigmoid), else softmax."""
    keras = import_keras()
    inputs = keras.Input((dim,), name="embedding")
    x = inputs
    for i in range(layers):
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    head = "sigmoid" if outputs == 1 else "softmax"
    model = keras.Model(inputs, keras.layers.Dense(outputs, activation=head, name="head")(x), name="pnsfw")
    loss = "binary_crossentropy" if outputs == 1 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    return model


def keras_layers(model: Any) -> list[Layer]:
    """A Keras model's BatchNorm and Dense layers as plain tensors (Input and Dropout carry none)."""
    keras = import_keras()
    layers: list[Layer] = []
    for layer in model.layers:
        weights = [keras.ops.convert_to_numpy(w) for w in layer.weights]
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = weights
            layers.append({"kind": "batchnorm", "gamma": gamma, "beta": beta, "mean": mean, "var": var,
                           "epsilon": float(layer.epsilon)})
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = weights
            layers.append({"kind": "dense", "kernel": kernel, "bias": bias,
                           "activation": keras.activations.serialize(layer.activation)})
        elif not isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout)):
            raise ModelNotFound(f"unsupported layer {type(layer).__name__} in classifier")
    return layers


def load_keras(path: Path) -> Any:
    keras = import_keras()
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a broken archive
        raise ModelNotFound(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None


def save_keras(model: Any, path: Path) -> None:
    """Keras wants a name ending in .keras: save in a temp folder, then move in atomically."""
    from ..store.files import atomic_write

    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        tmp = Path(folder) / "model.keras"
        model.save(tmp)
        atomic_write(path, lambda target: shutil.copyfile(tmp, target))


def keras_outputs(path: Path, vectors: Any) -> Any:
    """The saved Keras model's own forward pass (the reference the numpy one is tested against)."""
    import numpy as np

    keras = import_keras()
    model = load_keras(path)
    return keras.ops.convert_to_numpy(model(np.asarray(vectors, np.float32), training=False))
