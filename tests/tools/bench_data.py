"""Input pipeline at scale, without the model: decode throughput, batch throughput, peak memory.

    python tests/tools/bench_data.py [--images 20000] [--out data/bench] [--batch-size 32]

Draws N small phantom PNGs into --out (once; kept for the next run), decodes them into a fresh
image store as training does (worker processes, 200x200x3 uint8 on disk), then reads one
shuffled epoch of training batches through the trainer's `Batches`. Resident memory should not
grow with N: the store stays on disk and in the OS page cache.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=Path("data/bench"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="side of the drawn phantoms (decoding resizes to 200)")
    args = ap.parse_args()

    from xray_edge.preprocess import DEFAULT
    from xray_edge.train.cache import decode_to_store
    from xray_edge.train.dataset import discover
    from xray_edge.train.phantom import generate_phantoms

    t = time.perf_counter()
    generate_phantoms(args.out, n_train=args.images // 2, n_test=0, size=args.size)
    t_draw = time.perf_counter() - t
    paths = discover(args.out).train.paths
    cache = args.out / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # time a full decode every run

    t = time.perf_counter()
    d = decode_to_store(paths, DEFAULT, cache, progress=_progress)
    t_decode = time.perf_counter() - t
    rss_decode, rss_workers = peak_rss_mb(), peak_rss_mb(resource.RUSAGE_CHILDREN)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from xray_edge.train.batches import Batches

    labels = discover(args.out).train.labels[d.ok]
    batches = Batches(d.store, d.ok, labels, args.batch_size, seed=0)
    t = time.perf_counter()
    batches.on_epoch_begin()
    n = 0
    for i in range(len(batches)):
        x, y = batches[i]
        n += len(x)
    t_batches = time.perf_counter() - t
    assert n == len(d.ok)

    print(f"images: {len(d.ok)}")
    print(f"decode images_per_s: {len(d.ok) / t_decode:.0f}")
    print(f"batches images_per_s: {n / t_batches:.0f}")
    print(f"peak_rss_mb: {peak_rss_mb():.0f}")
    print(f"# peak_rss_mb after decoding, before importing keras: {rss_decode:.0f}; "
          f"decode workers' peak: {rss_workers:.0f}")
    print(f"# store {d.store.path} {d.store.path.stat().st_size / 1e6:.0f} MB; drawing {len(paths)} "
          f"phantoms: {t_draw:.1f} s (0 when already there); keras {keras.__version__} "
          f"({keras.backend.backend()}); {os.cpu_count()} cores")


def _progress(label: str, done: int, total: int) -> None:
    if done == total or done % 2000 < 16:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
