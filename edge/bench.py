"""`xray-edge bench`: how fast and how big a model is on this machine, batch of one."""

from __future__ import annotations

import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from xray_edge.classify import Classifier
from xray_edge.model import open_model
from xray_edge.preprocess import load_image


def _percentile(ms: list[float], q: float) -> float:
    return round(float(np.percentile(ms, q)), 3)


def synthetic_jpeg(path: Path, size: int = 1024) -> Path:
    """A film-like grey JPEG (torso, two lungs, ribs, a mediastinum, noise), so the benchmark needs
    no data and measures a real classification: the input gate accepts it, as it accepts the
    training phantoms (a gradient or plain noise would be refused before the model runs)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 25.0, np.float32)
    torso = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
    img[torso] = 115
    lungs = np.zeros_like(torso)
    for side in (-1, 1):
        lungs |= ((xx - 0.5 - side * 0.18) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    img[lungs] = 55
    img[lungs & (np.sin(2 * np.pi * (yy + 0.6 * (xx - 0.5) ** 2) / 0.075) > 0.55)] += 35  # ribs
    img[(np.abs(xx - 0.5) < 0.06 + 0.02 * (yy > 0.55)) & torso] = 170  # mediastinum and spine
    # soft edges, as tissue gives: a few flat grey levels would be refused as drawn (`posterized`)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 128)), np.float32)
    img += rng.normal(0, 7, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def run_bench(model: str, file_name: str | None, backend: str = "auto", runs: int = 100,
              image: Path | None = None, threads: int | None = None) -> dict:
    t = time.perf_counter()
    loaded = open_model(model, file_name, backend, threads)
    # includes the sha256 check, as in classify; not the check inference, reported as first invoke
    load_ms = (time.perf_counter() - t) * 1e3 - loaded.first_invoke_ms
    be, info, resolved = loaded.backend, loaded.info, loaded.resolved
    clf = Classifier(be, info)
    with tempfile.TemporaryDirectory() as tmp:
        img_path = image or synthetic_jpeg(Path(tmp) / "bench.jpg")
        x = load_image(img_path, info.preprocessing)
        first_ms = loaded.first_invoke_ms  # open_model's check on a blank image is the cold invoke
        lat = []
        for _ in range(runs):
            t = time.perf_counter()
            be.predict(x)
            lat.append((time.perf_counter() - t) * 1e3)
        n = max(10, runs // 2)
        t = time.perf_counter()
        for _ in clf.classify_paths([Path(img_path)] * n):
            pass
        wall = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            load_image(img_path, info.preprocessing)
        decode_ms = (time.perf_counter() - t) * 1e3 / n
    return {
        "model": str(resolved.path),
        "backend": f"{be.name} {be.version}",
        "threads": threads,
        "size_mb": round(resolved.path.stat().st_size / 1e6, 2),
        "load_ms": round(load_ms, 1),
        "first_invoke_ms": round(first_ms, 2),
        "latency_p50_ms": _percentile(lat, 50),
        "latency_p90_ms": _percentile(lat, 90),
        "latency_p99_ms": _percentile(lat, 99),
        "decode_ms_per_image": round(decode_ms, 2),
        "images_per_s_with_decode": round(n / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
