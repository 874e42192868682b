"""PNG reports of a model on labelled rows: PR and ROC curves, confusion matrices.

Drawn on matplotlib's Agg canvas (no pyplot, no global backend switch: safe in a server and in threads),
imported only when a plot is written. Every PNG is PLOT_PIXELS in size.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import at_threshold

DPI = 100
FIGSIZE = (5.0, 4.5)
PLOT_PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) of every PNG
THRESHOLD_STYLE = {"marker": "o", "color": "tab:red", "linestyle": "none", "markersize": 7}
CHANCE_STYLE = {"linestyle": "--", "color": "grey", "linewidth": 1}


def _pr(ax: Any, y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, p)
    ax.step(recall, precision, where="post", label=f"model (PR-AUC {average_precision_score(y, p):.3f})")
    ax.axhline(y.mean(), label=f"chance (prevalence {y.mean():.3f})", **CHANCE_STYLE)
    at = at_threshold(y, p, threshold)
    ax.plot([at["recall"]], [at["precision"]], label=f"threshold {threshold:.3f} "
            f"(P {at['precision']:.2f}, R {at['recall']:.2f})", **THRESHOLD_STYLE)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")


def _roc(ax: Any, y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, label=f"model (ROC-AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], label="chance (AUC 0.5)", **CHANCE_STYLE)
    at = at_threshold(y, p, threshold)
    ax.plot([at["fpr"]], [at["recall"]], label=f"threshold {threshold:.3f} "
            f"(FPR {at['fpr']:.2f}, TPR {at['recall']:.2f})", **THRESHOLD_STYLE)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC")


CURVES: dict[str, Callable[[Any, np.ndarray, np.ndarray, float], None]] = {"pr": _pr, "roc": _roc}


def _matrix(ax: Any, matrix: np.ndarray, names: list[str], title: str) -> None:
    """Counts, rows true, columns predicted, each cell written in the colour that reads on its shade."""
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=30 if len(names) > 2 else 0)
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    half = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, f"{count:,}", ha="center", va="center", color="white" if count > half else "black")


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, format="png", dpi=DPI)  # no bbox_inches="tight": every PNG keeps PLOT_PIXELS
    return str(path)


def save_plots(y: np.ndarray, p: np.ndarray, threshold: float, folder: Path, prefix: str = "",
               classes: "dict[str, Any] | None" = None) -> list[str]:
    """PREFIXpr.png and PREFIXroc.png (when both kinds are present), PREFIXconfusion.png (NSFW/safe at the
    threshold) and, given a class confusion (softmax), PREFIXclasses.png; returns their paths."""
    y, p = np.asarray(y, bool), np.asarray(p)
    if not len(y):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, draw in CURVES.items() if 0 < y.sum() < len(y) else ():
        fig = _figure()
        ax = fig.subplots()
        draw(ax, y, p, threshold)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
        written.append(_save(fig, folder / f"{prefix}{kind}.png"))
    at = at_threshold(y, p, threshold)
    matrices = [("confusion", np.array([[at["tp"], at["fn"]], [at["fp"], at["tn"]]]), ["NSFW", "safe"],
                 f"At threshold {threshold:.3f} ({len(y):,} rows)")]
    if classes is not None:
        matrices.append(("classes", np.array(classes["matrix"]), list(classes["classes"]), "Classes (argmax)"))
    for kind, matrix, names, title in matrices:
        fig = _figure()
        _matrix(fig.subplots(), matrix, names, title)
        written.append(_save(fig, folder / f"{prefix}{kind}.png"))
    return written
