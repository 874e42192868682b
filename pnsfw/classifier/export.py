"""`pnsfw export --format onnx`: the folded network written directly as an ONNX graph (no converter, any backend).

Inputs: `embedding` float32 (N, dim), or with `--raw` (N, width) raw CLIP features, projected in the
graph. Outputs: `probabilities` (N, classes) in
the order of the model's classes, and `p_nsfw` (N,). The classes, NSFW classes,
threshold and space fingerprint are in the graph's metadata_props.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import BadInput
from ..store import Projection, Store
from ..store.files import atomic_write
from .model import DEFAULT_NAME, Classifier, load_classifier, model_paths

OPSET = 17
IR_VERSION = 8  # what onnxruntime >= 1.10 reads; onnx's newest default can be ahead of the installed runtime


def _gelu_nodes(h: str, out: str, i: int) -> list[Any]:
    """0.5 * x * (1 + erf(x / sqrt 2)): Keras' exact gelu (ONNX's Gelu op needs opset 20)."""
    from onnx import helper

    return [helper.make_node("Mul", [h, "inv_sqrt2"], [f"g{i}_s"]),
            helper.make_node("Erf", [f"g{i}_s"], [f"g{i}_e"]),
            helper.make_node("Add", [f"g{i}_e", "one"], [f"g{i}_a"]),
            helper.make_node("Mul", [h, f"g{i}_a"], [f"g{i}_m"]),
            helper.make_node("Mul", [f"g{i}_m", "half"], [out])]


def _simple(op: str, **attrs: Any) -> Callable[[str, str, int], list[Any]]:
    from onnx import helper

    return lambda h, out, i: [helper.make_node(op, [h], [out], **attrs)]


def _activation_nodes(activation: str, h: str, out: str, i: int) -> list[Any]:
    table = {"tanh": _simple("Tanh"), "sigmoid": _simple("Sigmoid"), "softmax": _simple("Softmax", axis=1),
             "relu": _simple("Relu"), "linear": _simple("Identity"), "gelu": _gelu_nodes}
    if activation not in table:
        raise BadInput(f"cannot export activation {activation!r} to ONNX")
    return table[activation](h, out, i)


def _p_nsfw_nodes(clf: Classifier) -> tuple[list[Any], list[Any]]:
    """p_nsfw = probabilities @ mask (the NSFW columns summed)."""
    from onnx import helper, numpy_helper

    mask = np.array([[1.0 if c in clf.nsfw_classes else 0.0] for c in clf.classes], np.float32)
    nodes = [helper.make_node("MatMul", ["probabilities", "nsfw_mask"], ["p_nsfw_2d"]),
             helper.make_node("Squeeze", ["p_nsfw_2d", "axis1"], ["p_nsfw"])]
    return nodes, [numpy_helper.from_array(mask, "nsfw_mask"),
                   numpy_helper.from_array(np.array([1], np.int64), "axis1")]


def _probability_nodes(clf: Classifier, last: str) -> list[Any]:
    """Binary: [1 - p, p] ordered like the classes; softmax: the output itself."""
    from onnx import helper

    if not clf.binary:
        return [helper.make_node("Identity", [last], ["probabilities"])]
    inputs = ["neg", last] if clf.classes.index(clf.nsfw_classes[0]) == 1 else [last, "neg"]
    return [helper.make_node("Sub", ["one", last], ["neg"]),
            helper.make_node("Concat", inputs, ["probabilities"], axis=1)]


def _normalize_nodes(x: str, out: str) -> list[Any]:
    """x / max(||x||, 1e-12) per row (as pnsfw.store.projection.l2_normalize)."""
    from onnx import helper

    return [helper.make_node("ReduceL2", [x], [f"{out}_norm"], axes=[1], keepdims=1),
            helper.make_node("Max", [f"{out}_norm", "eps"], [f"{out}_safe"]),
            helper.make_node("Div", [x, f"{out}_safe"], [out])]


def _projection_nodes(projection: Projection) -> tuple[list[Any], list[Any]]:
    """Raw CLIP features -> the store's space: normalise, affine map, normalise (Projection.apply)."""
    from onnx import helper, numpy_helper

    nodes = _normalize_nodes("embedding", "raw_unit")
    if projection.kind == "none":
        return [*nodes, helper.make_node("Identity", ["raw_unit"], ["projected"])], []
    nodes += [helper.make_node("Gemm", ["raw_unit", "proj_w", "proj_b"], ["proj_z"])]
    nodes += _normalize_nodes("proj_z", "projected")
    weights = [numpy_helper.from_array(projection.matrix, "proj_w"), numpy_helper.from_array(projection.bias, "proj_b")]
    return nodes, weights


def build_onnx(clf: Classifier, projection: "Projection | None" = None) -> Any:
    """An onnx.ModelProto computing the classifier (of raw CLIP features, through `projection`, when given)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = {"one": 1.0, "half": 0.5, "inv_sqrt2": float(1 / np.sqrt(2)), "eps": 1e-12}
    init = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    nodes: list[Any] = []
    h, width = "embedding", clf.dim
    if projection is not None:
        nodes, extra = _projection_nodes(projection)
        init, h, width = init + extra, "projected", projection.width
    for i, step in enumerate(clf.steps):
        init += [numpy_helper.from_array(step.weight, f"w{i}"), numpy_helper.from_array(step.bias, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [f"z{i}"]))
        nodes += _activation_nodes(step.activation, f"z{i}", f"h{i}", i)
        h = f"h{i}"
    nodes += _probability_nodes(clf, h)
    extra_nodes, extra_init = _p_nsfw_nodes(clf)
    nodes += extra_nodes
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, f"pnsfw_{clf.name}",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(clf.classes)]),
         helper.make_tensor_value_info("p_nsfw", TensorProto.FLOAT, ["N"])],
        [t for t in init + extra_init if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pnsfw",
                              ir_version=IR_VERSION)
    meta = {"classes": clf.classes, "nsfw_classes": clf.nsfw_classes, "threshold": clf.threshold,
            "space": clf.space, "model_fingerprint": clf.fingerprint, "input": "raw" if projection else "space"}
    helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(model)
    return model


def export_onnx(store_root: "str | Path", name: str = DEFAULT_NAME, out: Optional["str | Path"] = None,
                raw: bool = False) -> Path:
    """Write the model as ONNX (default STORE/models/NAME.onnx; with `raw`, the store's projection built in
    so the input is a raw CLIP embedding: NAME.raw.onnx); returns the path."""
    store = Store.open(store_root)
    clf = load_classifier(store, name, check_space=raw)
    default = model_paths(store, name)["onnx"]
    path = Path(out) if out else default.with_suffix(".raw.onnx") if raw else default
    data = build_onnx(clf, store.projection() if raw else None).SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


EXPORTERS: dict[str, Callable[..., Path]] = {"onnx": export_onnx}
