"""The report's saliency page: where each format looks, and how much of it is the image's frame.

Grad-CAM needs gradients, so it runs on the Keras model (TensorFlow, where the report runs);
occlusion needs only forward passes, so it runs on every exported file through its edge runtime,
as `xray-edge explain` does on a device. The "frame share" (see `xray_edge.explain.frame_share`)
sums each up in one number: the share of the attribution in the outer 15% band of the image,
where text, markers and film borders sit and lungs do not.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
from PIL import Image

from xray_edge import explain
from xray_edge.backends import open_backend
from xray_edge.classify import predicted_classes
from xray_edge.train.plotting import pyplot, save_png

PER_CLASS = 4  # sample images per class: 65 invokes each per format


def grad_cam(model, images: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017) on the last Conv2D layer, upsampled to the input size.

    Args:
        model: the Keras model (sigmoid output P(labels[1])).
        images: uint8 [N, H, W, C].
        explained: the class index (0 or 1) explained for each image.
    Returns:
        float [N, H, W], >= 0: the class's evidence by location.
    """
    import keras
    import tensorflow as tf

    conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    x = tf.convert_to_tensor(images.astype("float32"))
    k = tf.convert_to_tensor(np.asarray(explained, "float32"))
    with tf.GradientTape() as tape:
        # layer by layer (the project's models are Sequential), keeping the last conv's output
        h = x
        for layer in model.layers:
            h = layer(h, training=False) if "training" in inspect.signature(layer.call).parameters else layer(h)
            if layer is conv:
                acts = h
        p = h[:, 0]
        score = k * p + (1 - k) * (1 - p)  # P(explained class); images are independent
    grads = tape.gradient(score, acts)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(acts * weights, axis=-1)).numpy()
    h, w = images.shape[1:3]
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
                     for c in cams])


def sample(y: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of up to `per_class` images of each class, spread evenly over the test set."""
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picks += idx[np.linspace(0, len(idx) - 1, min(per_class, len(idx))).round().astype(int)].tolist()
    return np.asarray(sorted(set(picks)), dtype=np.int64)


def page(model, manifest, artifacts: Path, images: np.ndarray, y: np.ndarray, out: Path,
         per_class: int = PER_CLASS, occlusion: explain.Occlusion = explain.DEFAULT) -> dict:
    """Measure Grad-CAM (Keras) and occlusion (every manifest file) on a sample; draw the page.

    Each image is explained for the label the model gives it at the manifest's threshold.
    Writes out/report_saliency.png; returns the figures for report.json.
    """
    classes = list(manifest.labels)
    idx = sample(y, per_class)
    x, yt = images[idx], y[idx]
    ref = np.asarray(model.predict(x, verbose=0), np.float32)
    explained = predicted_classes(ref, manifest.threshold)
    keras_file = manifest.source_model.get("file", "model.keras")
    # (format, file, method) -> attribution maps [n, H, W]
    maps = {("keras", keras_file, "Grad-CAM"): grad_cam(model, x, explained)}
    for name, entry in manifest.files.items():
        be = open_backend(artifacts / name, threads=os.cpu_count())
        maps[(entry.format, name, "occlusion")] = np.stack([
            explain.explain_image(img, be.predict, manifest.labels, manifest.threshold, occlusion).pixels
            for img in x])
    # beside Grad-CAM: the int8 file, the one a device runs (else the first exported)
    occluded = [k for k in maps if k[2] == "occlusion"]
    shown = next((k for k in occluded if k[0] == "int8"), occluded[0])
    rows = []
    for (fmt, name, method), m in maps.items():
        shares = np.array([explain.frame_share(a) for a in m])
        rows.append({"format": fmt, "file": name, "method": method,
                     "per_image": [round(float(s), 4) for s in shares], "frame_share": _mean(shares),
                     "by_class": {c: _mean(shares[yt == i]) for i, c in enumerate(classes)}})
    cam_key = next(iter(maps))
    _plot(x, yt, explained, classes, (maps[cam_key], rows[0]["per_image"]),
          (maps[shown], rows[list(maps).index(shown)]["per_image"], shown[0]), out / "report_saliency.png")
    return {"frame": explain.FRAME, "per_class": per_class, "images": [int(i) for i in idx],
            "occlusion": {"grid": occlusion.grid, "patch_px": occlusion.patch, "fill": "image mean"},
            "rows": rows, "figure": "report_saliency.png"}


def _mean(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 4) if len(v) else None


def _plot(x, yt, explained, classes, cam, occ, path: Path) -> None:
    """Rows of (image, Grad-CAM, occlusion); `cam` is (maps, shares), `occ` (maps, shares, format)."""
    plt = pyplot()
    n = len(x)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False, layout="constrained")
    for i in range(n):
        grey = x[i][..., 0]
        cols = [(None, f"true {classes[yt[i]]}, called {classes[explained[i]]}"),
                (cam[0][i], f"Grad-CAM, Keras: frame {cam[1][i]:.2f}"),
                (occ[0][i], f"occlusion, {occ[2]}: frame {occ[1][i]:.2f}")]
        for ax, (heat, title) in zip(axes[i], cols):
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
            if heat is not None:
                h = np.clip(heat, 0, None)
                ax.imshow(h / h.max() if h.max() > 0 else h, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
            f = explain.FRAME * grey.shape[0]
            ax.add_patch(plt.Rectangle((f, f), grey.shape[1] - 2 * f, grey.shape[0] - 2 * f,
                                       fill=False, ec="cyan", lw=0.8, ls="--"))
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("Where the model looks (dashed: inside the 15% frame)", fontsize=10)
    save_png(fig, path)
