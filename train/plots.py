"""Training figures: loss and accuracy curves, a grid of sample images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge.train.plotting import pyplot, save_png


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
