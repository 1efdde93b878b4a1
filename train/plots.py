"""Matplotlib figures a person would rather look at than read: curves, samples, ROC."""

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


def training_curves(history: dict, path: Path, synthetic: bool = False) -> None:
    """Loss and accuracy, training vs validation, side by side (as the tutorial plotted them)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history.get(key, []), "o-", label=f"training {key}")
        ax.plot(epochs, history.get(f"val_{key}", []), "s-", label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    title = "Training curves" + ("  [SYNTHETIC phantom data]" if synthetic else "")
    fig.suptitle(title, color="darkred" if synthetic else "black")
    save_png(fig, path)


def sample_grid(images: np.ndarray, labels: np.ndarray, paths: list, classes: list[str],
                path: Path, per_class: int = 8) -> None:
    """The tutorial's 4x4 grid: up to 8 images of the first two classes, titled with file names."""
    plt = pyplot()
    chosen = []
    for c in range(min(2, len(classes))):
        chosen += list(np.flatnonzero(labels == c)[:per_class])
    fig, axes = plt.subplots(4, 4, figsize=(12, 12.5))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen):
        ax.imshow(images[i])
        name = Path(paths[i]).name
        ax.set_title(f"{classes[labels[i]]}\n{name if len(name) <= 34 else name[:31] + '...'}", fontsize=8)
    save_png(fig, path)


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
