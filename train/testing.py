"""Small real models for tests and the emulated-Pi check: the tutorial's layers, built in seconds.

Not used by training itself. They live in the package (not in tests/) so that
`tests/tools/emulated_pi.py`, a user-facing script, does not lean on test code.
"""

from __future__ import annotations

from pathlib import Path


def tiny_model(num_classes: int = 2, seed: int = 9):
    """The tutorial's layer types at a fraction of the width: converts in seconds.

    Seed 9 spreads its outputs over 0.12-0.92 on the test images, none within 0.01 of the
    threshold, so int8 rounding cannot flip a decision by accident.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((200, 200, 3), name="image"),
        layers.Rescaling(1 / 255),
        layers.Conv2D(4, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(4),
        layers.Dropout(0.2),
        layers.Conv2D(4, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(5),
        layers.Flatten(),
        layers.Dense(8, activation="relu"),
        # wide initial weights: outputs spread over (0, 1) instead of sitting at 0.5, so a test
        # that compares decisions is not decided by rounding at the threshold
        layers.Dense(1 if num_classes == 2 else num_classes,
                     activation="sigmoid" if num_classes == 2 else "softmax",
                     kernel_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=seed)),
    ])


def save_with_record(model, folder: Path, classes, data: Path, preprocessing=None) -> Path:
    """Save like the trainer does: model.keras + training.json with split file lists."""
    from xray_edge.inputs import walk_images
    from xray_edge.training_record import TrainingRecord

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.keras"
    model.save(path)
    train = [str(p) for p in walk_images(data / "train")]
    test = [str(p) for p in walk_images(data / "test")] if (data / "test").is_dir() else train[1::2]
    if not (data / "test").is_dir():
        train = train[0::2]
    def label(p: str) -> int:
        return next(i for i, c in enumerate(classes) if f"/{c}/" in p)

    extra = {"preprocessing": preprocessing} if preprocessing is not None else {}
    TrainingRecord(classes=list(classes), positive_class=classes[0], data=str(data), **extra,
                   synthetic=(data / "SYNTHETIC").exists(),
                   files={"train": train, "validation": [], "test": test},
                   labels={"train": [label(p) for p in train], "validation": [],
                           "test": [label(p) for p in test]}).write(folder)
    return path
