"""Training speed: seconds per epoch and images per second for the full recipe (zoom + flip).

    python tests/tools/bench_train.py [--images 1811] [--epochs 3] [--batch-size 32]
        [--backend jax] [--precision mixed_bfloat16] [--devices N|all] [--cache-dir DIR]

Picks the backend as `xray-edge train` does (--backend, else KERAS_BACKEND, else JAX where it can
use a visible NVIDIA GPU) and prints the device. The images are synthetic phantoms written to an
image store and streamed in shuffled batches, as training does. --cache-dir enables JAX's
persistent compilation cache there: run twice to see the first epoch without compiling.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None,
                    help="training images (default: 1811, the tutorial's size; 256 on a CPU)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None)
    ap.add_argument("--precision", choices=["float32", "mixed_bfloat16"], default="float32")
    ap.add_argument("--devices", default="1", help="N or all (data-parallel, JAX)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="JAX compilation cache under DIR/jax")
    args = ap.parse_args()

    from xray_edge.train import device

    gpus = device.visible_gpus()
    chosen = device.choose_backend(args.backend, os.environ.get("KERAS_BACKEND"), gpus,
                                   device.jax_cuda_installed())
    if chosen:
        os.environ["KERAS_BACKEND"] = chosen
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from xray_edge.preprocess import DEFAULT
    from xray_edge.train.batches import Batches
    from xray_edge.train.model import build_model
    from xray_edge.train.phantom import phantom_image
    from xray_edge.train.store import ImageStore
    from xray_edge.train.trainer import TrainConfig, backend_settings, training_model

    cfg = TrainConfig(data=None, precision=args.precision, cache_dir=args.cache_dir,
                      devices=args.devices if args.devices == "all" else int(args.devices))
    with backend_settings(cfg), tempfile.TemporaryDirectory() as tmp:
        devices = device.training_devices(cfg.devices)
        warning = device.unused_gpu_warning(gpus, devices)
        n = args.images or (1811 if devices.accelerator else 256)
        t = time.perf_counter()
        store = ImageStore.create(Path(tmp) / "bench.npy", n, DEFAULT.shape)
        for i in range(n):
            img = phantom_image(np.random.default_rng(i), i % 2 == 0, size=DEFAULT.size)
            store.write(i, np.repeat(img[..., None], 3, 2))
        y = (np.arange(n) % 2 == 1).astype("float32")
        t_data = time.perf_counter() - t

        keras.utils.set_random_seed(0)
        trainer = training_model(build_model(2), cfg)  # recipe defaults: batch 32, Adam 1e-4, zoom, flip
        batches = Batches(store, np.arange(n), y, args.batch_size, seed=0, devices=len(devices.names))
        t = time.perf_counter()
        trainer.fit(batches, epochs=1, verbose=0)  # compile + first epoch
        t_first = time.perf_counter() - t
        times = []
        for _ in range(args.epochs):
            t = time.perf_counter()
            trainer.fit(batches, epochs=1, verbose=0)
            times.append(time.perf_counter() - t)
    per_epoch = float(np.median(times))
    if warning:
        print(warning)
    print(f"backend            {keras.backend.backend()} (keras {keras.__version__})")
    print(f"device             {devices.describe()}")
    print(f"machine            {platform.machine()}, {os.cpu_count()} cores")
    print(f"images             {n} at {DEFAULT.size}x{DEFAULT.size}, batch {args.batch_size}, zoom 0.2 + flip, "
          f"{args.precision}")
    print(f"make data          {t_data:.2f} s (phantoms, into an image store)")
    print(f"first epoch        {t_first:.2f} s (includes compilation"
          f"{', persistent cache in ' + str(args.cache_dir / 'jax') if args.cache_dir and keras.backend.backend() == 'jax' else ''})")
    print(f"s per epoch        {per_epoch:.3f} (median of {len(times)})")
    print(f"images per s       {n / per_epoch:.0f}")
    print(f"30 epochs, est.    {t_first + 29 * per_epoch:.1f} s")


if __name__ == "__main__":
    main()
