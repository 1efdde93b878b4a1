"""Figures shared by training and the report (ROC curves), drawn with matplotlib on demand.

In train/, not in the device package: only training and the report draw. matplotlib is imported
inside the functions, so importing this module costs nothing until a figure is drawn.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from xray_edge.files import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write the figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def roc(y_pos: np.ndarray, score: np.ndarray, path: Path, title: str = "ROC",
        curves: dict | None = None) -> None:
    """ROC curve(s): `curves` maps a name to (y_pos, score) to draw several on one chart."""
    from xray_edge import metrics

    plt = pyplot()
    curves = curves or {"model": (y_pos, score)}
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = metrics.roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save_png(fig, path)
