"""Tiny CNNs trained in seconds on in-memory phantoms, for the site and saliency tests.

Classes are ("COVID19", "NORMAL") as in the phantom set; the sigmoid output is P(NORMAL).
"""

from __future__ import annotations

import numpy as np

from xray_edge.train.phantom import CLASSES, phantom_with_lungs

SIZE = 200  # drawn at the model's input size, so the lung masks line up with the input pixels


def phantom_arrays(n: int, seed: int, marker: bool = False, transform=None):
    """n phantoms per class: (uint8 [2n, 200, 200, 3], labels [2n], lung masks bool [2n, 200, 200]).

    `marker` puts the corner marker on every COVID19 image (a planted shortcut); `transform`
    maps float pixels to float pixels (another site's contrast).
    """
    xs, ys, masks = [], [], []
    for ci, cls in enumerate(CLASSES):
        for i in range(n):
            img, lungs = phantom_with_lungs(np.random.default_rng([seed, ci, i]), cls == "COVID19", SIZE,
                                            marker=marker and cls == "COVID19")
            if transform is not None:
                img = np.clip(transform(img.astype(np.float32)), 0, 255).astype(np.uint8)
            xs.append(np.repeat(img[:, :, None], 3, axis=2))
            ys.append(ci)
            masks.append(lungs)
    return np.stack(xs), np.asarray(ys), np.stack(masks)


def fit_tiny(x: np.ndarray, y: np.ndarray, epochs: int = 8, seed: int = 3):
    """A small CNN fitted with Keras directly (no trainer, no augmentation): seconds on 2 cores."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3), name="image"),
        layers.Rescaling(1 / 255),
        layers.Conv2D(8, 5, strides=2, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv"),
        layers.GlobalMaxPooling2D(),
        layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y.astype("float32"), epochs=epochs, batch_size=16, verbose=0, shuffle=True)
    return model
