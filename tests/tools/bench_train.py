"""Training speed: seconds per epoch and images per second for the full recipe (zoom + flip).

    python tests/tools/bench_train.py [--images 1811] [--epochs 3] [--batch-size 32]

Runs on whatever Keras backend and device is there (KERAS_BACKEND=jax on a GPU machine needs no
TensorFlow). The images are synthetic phantoms decoded once into a uint8 array, as training does.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None,
                    help="training images (default: 1811, the tutorial's size; 256 on a CPU)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import keras

    from xray_edge.preprocess import DEFAULT
    from xray_edge.train.model import build_model
    from xray_edge.train.phantom import phantom_image
    from xray_edge.train.trainer import TrainConfig, training_model

    devices = _devices()
    gpu = any("gpu" in d.lower() or "cuda" in d.lower() for d in devices)
    n = args.images or (1811 if gpu else 256)
    t = time.perf_counter()
    x = np.stack([np.repeat(phantom_image(np.random.default_rng(i), i % 2 == 0, size=DEFAULT.size)[..., None], 3, 2)
                  for i in range(n)])
    y = (np.arange(n) % 2 == 1).astype("float32")
    t_data = time.perf_counter() - t

    keras.utils.set_random_seed(0)
    cfg = TrainConfig(data=None)  # recipe defaults: batch 32, Adam 1e-4, zoom 0.2, flip
    trainer = training_model(build_model(2), cfg)
    t = time.perf_counter()
    trainer.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)  # compile + first epoch
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.epochs):
        t = time.perf_counter()
        trainer.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
        times.append(time.perf_counter() - t)
    per_epoch = float(np.median(times))
    print(f"backend            {keras.backend.backend()} (keras {keras.__version__})")
    print(f"device             {', '.join(devices)}")
    print(f"machine            {platform.machine()}, {os.cpu_count()} cores")
    print(f"images             {n} at {DEFAULT.size}x{DEFAULT.size}, batch {args.batch_size}, zoom 0.2 + flip")
    print(f"make data          {t_data:.2f} s (phantoms, in memory)")
    print(f"first epoch        {t_first:.2f} s (includes compilation)")
    print(f"s per epoch        {per_epoch:.3f} (median of {len(times)})")
    print(f"images per s       {n / per_epoch:.0f}")
    print(f"30 epochs, est.    {t_first + 29 * per_epoch:.1f} s")


def _devices() -> list[str]:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return [str(d) for d in jax.devices()]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices()]
    except Exception as exc:  # noqa: BLE001 - informational only
        return [f"unknown ({exc})"]


if __name__ == "__main__":
    main()
