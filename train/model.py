"""The tutorial's CNN, with the pixel scaling folded in so exported files take 0-255 pixels."""

from __future__ import annotations

import keras
from keras import layers

from xray_edge.preprocess import DEFAULT, Preprocessing


def build_model(num_classes: int = 2, spec: Preprocessing = DEFAULT) -> keras.Model:
    """The tutorial's layer stack: two 5x5 conv blocks, Flatten, Dense 256, sigmoid.

    Two classes give the tutorial's single sigmoid unit (probability of class index 1);
    more give a softmax over the classes.
    """
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    binary = num_classes == 2
    return keras.Sequential(
        [
            keras.Input(shape=spec.shape, name="image"),
            layers.Rescaling(1.0 / 255, name="scale_0_1"),
            layers.Conv2D(32, (5, 5), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Dropout(0.2),
            layers.Conv2D(64, (5, 5), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Dropout(0.2),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(1 if binary else num_classes,
                         activation="sigmoid" if binary else "softmax", name="probability"),
        ],
        name="xray_cnn",
    )
