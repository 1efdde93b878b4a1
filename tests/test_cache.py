"""The decode cache on disk: exact pixels, resumption after an interruption, stale keys, and the
batches that training reads from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_edge.preprocess import DEFAULT, Preprocessing, load_image
from xray_edge.train.cache import CHUNK, MIN_IMAGES_PER_WORKER, decode_to_store
from xray_edge.train.store import ImageStore

SMALL = Preprocessing(size=24)


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        mode = "L" if i % 2 else "RGB"
        shape = (40 + i % 7, 50) if mode == "L" else (40 + i % 7, 50, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        paths.append(p)
    return paths


def _direct(paths, spec):
    return np.stack([load_image(p, spec) for p in paths])


def test_store_pixels_equal_a_direct_decode_and_bad_files_are_listed(tmp_path):
    paths = _images(tmp_path / "img", 2 * MIN_IMAGES_PER_WORKER + 5)  # two worker processes
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths.insert(7, bad)
    lines = []
    d = decode_to_store(paths, DEFAULT, tmp_path / "cache", workers=2, log=lines.append)
    assert any("2 worker processes" in s for s in lines)
    good = [p for p in paths if p != bad]
    assert list(d.ok) == [i for i, p in enumerate(paths) if p != bad]
    assert len(d.errors) == 1 and "broken.png" in d.errors[0]
    assert np.array_equal(d.store.read(d.ok), _direct(good, DEFAULT))
    # the file is a plain .npy: numpy opens it as a memory map
    m = np.load(d.store.path, mmap_mode="r")
    assert m.shape == (len(paths), *DEFAULT.shape) and np.array_equal(m[8], load_image(paths[8]))


def test_second_run_reads_the_cache(tmp_path):
    paths = _images(tmp_path / "img", 5)
    decode_to_store(paths, SMALL, tmp_path / "cache")
    lines = []
    calls = []
    d = decode_to_store(paths, SMALL, tmp_path / "cache", log=lines.append,
                        progress=lambda *a: calls.append(a))
    assert any("from cache" in s for s in lines) and calls == []
    assert np.array_equal(d.store.read(d.ok), _direct(paths, SMALL))


def test_interrupted_decode_resumes_where_it_stopped(tmp_path):
    paths = _images(tmp_path / "img", 2 * MIN_IMAGES_PER_WORKER)
    cache = tmp_path / "cache"

    def interrupt(label, done, total):
        if done >= CHUNK:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_to_store(paths, SMALL, cache, workers=2, progress=interrupt)
    assert not list(cache.glob("*[0-9a-f].npy"))  # nothing under the final name yet
    assert len(list(cache.glob("*.partial.npy"))) == 1

    lines, first = [], []
    d = decode_to_store(paths, SMALL, cache, workers=1, log=lines.append,
                        progress=lambda label, done, total: first.append(done) if not first else None)
    assert first == [CHUNK]  # the finished rows were not decoded again
    assert any(f"resuming, {CHUNK} of {len(paths)}" in s for s in lines)
    assert np.array_equal(d.store.read(d.ok), _direct(paths, SMALL))
    assert not list(cache.glob("*.partial.npy"))


def test_changed_file_or_recipe_never_reuses_stale_pixels(tmp_path):
    paths = _images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    before = decode_to_store(paths, SMALL, cache).store.read(np.arange(4))
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(paths[2])  # same name, new content
    after = decode_to_store(paths, SMALL, cache).store.read(np.arange(4))
    assert np.array_equal(after, _direct(paths, SMALL)) and not np.array_equal(after[2], before[2])
    other = Preprocessing(size=24, resample="bicubic")
    d = decode_to_store(paths, other, cache)
    assert np.array_equal(d.store.read(d.ok), _direct(paths, other))
    assert len(list(cache.glob("*[0-9a-f].npy"))) == 3


def test_store_reads_any_rows_in_the_order_asked(tmp_path):
    store = ImageStore.create(tmp_path / "s.npy", 10, (3, 4, 3))
    data = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 3), dtype=np.uint8)
    for i, img in enumerate(data):
        store.write(i, img)
    rows = [9, 2, 3, 4, 0, 0, 7]
    assert np.array_equal(store.read(rows), data[rows])
    with pytest.raises(IndexError):
        store.read([10])


# ------------------------------------------------------------------ batches
def _store_of(tmp_path, n):
    store = ImageStore.create(tmp_path / "b.npy", n, (2, 2, 3))
    for i in range(n):
        store.write(i, np.full((2, 2, 3), i, np.uint8))  # pixel value = row
    return store


def test_batches_shuffle_every_epoch_reproducibly_and_keep_labels_with_images(tmp_path):
    from xray_edge.train.batches import Batches

    store = _store_of(tmp_path, 30)
    rows = np.arange(3, 28)  # some rows unused, as for files that failed to decode
    labels = rows % 3
    seen = []
    for _ in range(2):
        b = Batches(store, rows, labels, batch_size=8, seed=5)
        epochs = []
        for _ in range(2):
            b.on_epoch_begin()
            batches = [b[i] for i in range(len(b))]
            got = np.concatenate([x[:, 0, 0, 0] for x, _ in batches])
            for x, y in batches:
                assert np.array_equal(y, x[:, 0, 0, 0] % 3)  # each label travels with its image
            assert sorted(got) == list(rows)  # every image once per epoch
            epochs.append(got)
            b.on_epoch_end()
        assert not np.array_equal(epochs[0], epochs[1])
        seen.append(epochs)
    assert np.array_equal(seen[0][0], seen[1][0]) and np.array_equal(seen[0][1], seen[1][1])


def test_batches_for_two_devices_pad_with_zero_weight(tmp_path):
    from xray_edge.train.batches import Batches

    store = _store_of(tmp_path, 11)
    b = Batches(store, np.arange(11), np.arange(11) % 2, batch_size=4, devices=2)
    x, y, w = b[len(b) - 1]  # rows 8, 9, 10 + one copy
    assert x.shape[0] == 4 and list(w) == [1, 1, 1, 0] and list(x[:, 0, 0, 0]) == [8, 9, 10, 10]
    assert list(b[0][2]) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="multiple"):
        Batches(store, np.arange(11), batch_size=5, devices=2)


def test_streamed_prediction_keeps_the_rows_order(tmp_path):
    import keras

    from xray_edge.train.batches import predict

    store = _store_of(tmp_path, 13)
    model = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten(),
                              keras.layers.Lambda(lambda t: t[:, :1])])
    rows = np.array([12, 0, 5, 6, 1, 11, 3])
    out = predict(model, store, rows, batch_size=3)
    assert np.array_equal(out[:, 0], rows.astype(np.float32))
