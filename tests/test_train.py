"""The recipe, the data loader's errors, collapse detection, and a short real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_edge.errors import DatasetError
from xray_edge.train.dataset import discover, stratified_split


def test_layer_stack_is_the_tutorials():
    from xray_edge.train.model import build_model

    m = build_model(2)
    kinds = [(type(l).__name__, getattr(l, "filters", None) or getattr(l, "units", None))
             for l in m.layers]
    assert kinds == [("Rescaling", None), ("Conv2D", 32), ("MaxPooling2D", None), ("Dropout", None),
                     ("Conv2D", 64), ("MaxPooling2D", None), ("Dropout", None), ("Flatten", None),
                     ("Dense", 256), ("Dropout", None), ("Dense", 1)]
    assert tuple(m.inputs[0].shape[1:]) == (200, 200, 3)
    convs = [l for l in m.layers if type(l).__name__ == "Conv2D"]
    assert all(c.kernel_size == (5, 5) and c.padding == "same" for c in convs)
    assert m.layers[-1].activation.__name__ == "sigmoid"
    # by hand: conv 5*5*3*32+32, conv 5*5*32*64+64, dense (50*50*64)*256+256, out 256+1
    assert m.count_params() == 2_432 + 51_264 + 40_960_256 + 257
    assert build_model(3).layers[-1].units == 3 and build_model(3).layers[-1].activation.__name__ == "softmax"


def test_pixel_scaling_is_inside_the_model():
    import keras

    from xray_edge.train.model import build_model

    m = build_model(2)
    assert m.layers[0].scale == pytest.approx(1 / 255)
    # the rest of the network fed x/255 by hand equals the whole model fed raw 0-255 pixels
    x = np.random.default_rng(0).integers(0, 256, (2, 200, 200, 3)).astype("float32")
    rest = keras.Sequential(m.layers[1:])
    np.testing.assert_allclose(m(x, training=False), rest(x / 255, training=False), rtol=1e-5, atol=1e-6)


def test_augmentation_only_in_training():

    from xray_edge.train.augment import ZoomFlip

    layer = ZoomFlip(0.2, True, seed=1)
    x = np.random.default_rng(0).integers(0, 256, (4, 200, 200, 3)).astype("float32")
    assert np.array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape and not np.allclose(y, x)
    assert y.min() >= 0 and y.max() <= 255  # convex combinations of pixels


def test_degrade_blurs_and_compresses_like_jpeg_only_in_training(tmp_path):
    """The re-compression is JPEG's lossy step: it lands where Pillow's own JPEG encoder lands."""
    import io

    from keras import ops
    from PIL import Image

    from xray_edge.bench import synthetic_jpeg
    from xray_edge.train.augment import Degrade, _gaussian, _jpeg_blocks

    film = np.asarray(Image.open(synthetic_jpeg(tmp_path / "film.jpg", 200)).convert("L"), np.float32)
    x = np.repeat(film[None, :, :, None], 3, axis=3)
    for quality in (30, 75):
        buf = io.BytesIO()
        Image.fromarray(film.astype(np.uint8)).save(buf, format="JPEG", quality=quality, subsampling=0)
        pillow = np.asarray(Image.open(buf).convert("L"), np.float32)
        ours = np.asarray(_jpeg_blocks(ops.convert_to_tensor(x[:1]), ops.convert_to_tensor([float(quality)])))[0, :, :, 0]
        change = np.abs(pillow - film).mean()
        assert change > 0.5 and np.abs(ours - pillow).mean() < 0.3 * change
    weights = np.asarray(_gaussian(ops.convert_to_tensor([1.0]), 200))[0]
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-5)
    blurred = weights @ film @ weights.T
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.8 * np.abs(np.diff(film, axis=1)).mean()

    layer = Degrade(1.0, seed=1)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape and not np.allclose(y, x) and y.min() >= 0 and y.max() <= 255
    assert np.array_equal(np.asarray(Degrade(0.0, seed=1)(x, training=True)), x)
    odd = x[:, :203, :197]  # sides that are not multiples of 8: the whole blocks only
    y = np.asarray(layer(odd, training=True))
    assert y.shape == odd.shape and not np.allclose(y, odd)


def test_zoom_one_without_flip_is_identity_and_flip_mirrors():
    from keras import ops

    from xray_edge.train.augment import _resampler

    x = np.random.default_rng(0).random((1, 6, 6, 1)).astype("float32")
    ident = np.asarray(_resampler(ops.convert_to_tensor([1.0]), 6, "float32"))[0]
    np.testing.assert_allclose(ident, np.eye(6), atol=1e-6)
    mirror = np.asarray(_resampler(ops.convert_to_tensor([-1.0]), 6, "float32"))[0]
    np.testing.assert_allclose(mirror @ x[0, 0, :, 0], x[0, 0, ::-1, 0], atol=1e-6)


def test_validation_is_never_augmented(tmp_path, phantom_data):
    """Keras evaluates validation with training=False; check the trainer's model routes it so."""
    import keras

    from xray_edge.train.augment import ZoomFlip

    inner = keras.Sequential([keras.Input((200, 200, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation="sigmoid")])
    wrapper = keras.Sequential([keras.Input((200, 200, 3)), ZoomFlip(0.2, True, seed=0), inner])
    x = np.random.default_rng(0).integers(0, 256, (4, 200, 200, 3)).astype("float32")
    np.testing.assert_allclose(wrapper.predict(x, verbose=0), inner.predict(x, verbose=0), rtol=1e-6)


def test_stratified_split_keeps_class_shares():
    labels = np.array([0] * 50 + [1] * 30)
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert len(set(keep) & set(held)) == 0 and len(keep) + len(held) == 80
    assert (labels[held] == 0).sum() == 10 and (labels[held] == 1).sum() == 6
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=3)[1])


def test_one_source_without_patients_splits_as_before():
    """The phantom default keeps its split: per class, a seeded permutation, the first 20% held."""
    labels = np.random.default_rng(0).integers(0, 2, 57)
    rng = np.random.default_rng(11)
    old = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        old.append(idx[:min(len(idx) - 1, max(1, round(0.2 * len(idx))))])
    assert np.array_equal(stratified_split(labels, 0.2, seed=11)[1], np.sort(np.concatenate(old)))


# ------------------------------------------------------------------ dataset errors
def _img(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(p)


def test_missing_train_folder(tmp_path):
    with pytest.raises(DatasetError, match="train"):
        discover(tmp_path)


def test_one_class_only(tmp_path):
    _img(tmp_path / "train" / "NORMAL" / "a.png")
    with pytest.raises(DatasetError, match="at least two class"):
        discover(tmp_path)


def test_empty_class(tmp_path):
    _img(tmp_path / "train" / "NORMAL" / "a.png")
    (tmp_path / "train" / "COVID19").mkdir()
    with pytest.raises(DatasetError, match="COVID19.*no images"):
        discover(tmp_path)


def test_classes_sorted_and_non_images_skipped(tmp_path):
    _img(tmp_path / "train" / "NORMAL" / "a.png")
    _img(tmp_path / "train" / "COVID19" / "b.png")
    (tmp_path / "train" / "COVID19" / "notes.txt").write_text("hi")
    ds = discover(tmp_path)
    assert ds.classes == ["COVID19", "NORMAL"] and len(ds.train) == 2
    assert [Path(s).name for s in ds.skipped] == ["notes.txt"]


def test_cli_reports_dataset_error_in_one_line(tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--data", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "train" in r.stderr


# ------------------------------------------------------------------ real training runs
def _with_corrupt_file(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "train" / "NORMAL" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return dst


def test_short_run_on_phantoms_writes_everything_and_skips_bad_files(tmp_path, phantom_data, capfd):
    from xray_edge.train.trainer import TrainConfig, train

    data = _with_corrupt_file(phantom_data, tmp_path / "data")
    out = tmp_path / "out"
    train(TrainConfig(data=data, out=out, epochs=2, learning_rate=1e-4, verbose=0,
                            cache_dir=tmp_path / "cache"))
    for f in ("model.keras", "history.json", "training.png", "samples.png", "metrics.json",
              "roc.png", "training.json"):
        assert (out / f).stat().st_size > 0, f
    err = capfd.readouterr().err
    assert "broken.jpg" in err and "SYNTHETIC" in err and "device: cpu" in err
    rec = json.loads((out / "training.json").read_text())
    assert rec["synthetic"] is True and rec["classes"] == ["COVID19", "NORMAL"]
    assert rec["precision"] == "float32" and len(rec["devices"]) == 1
    sec = rec["seconds"]  # compile (in the first epoch), the other epochs and the rest, apart
    assert sec["first_epoch_with_compile"] > 0 and sec["later_epochs"] > 0 and sec["after_training"] > 0
    assert sec["decode"] + sec["train"] + sec["after_training"] == pytest.approx(sec["total"], rel=1e-6)
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is True and {"loss", "accuracy", "roc_auc", "sensitivity", "specificity"} <= set(m)
    assert len(m["sensitivity"]["ci95"]) == 2
    assert not set(rec["files"]["validation"]) & set(rec["files"]["train"])
    assert len(list((tmp_path / "cache").glob("*[0-9a-f].npy"))) == 3  # train, validation, test decoded once
    from xray_edge.metadata import read_keras_metadata as read_model_metadata

    assert read_model_metadata(out / "model.keras")["synthetic"] is True


def test_real_films_get_the_studied_recipe_and_phantoms_the_tutorials():
    from xray_edge.train.launch import recipe

    assert recipe(True) == {"photometric": 0.3, "border_erase": 0.5, "batch_size": 8}
    assert recipe(False) == {"photometric": 0.0, "border_erase": 0.0, "batch_size": 32}
    # a value given on the command line wins, 0 included
    assert recipe(True, photometric=0.0, batch_size=32) == {"photometric": 0.0, "border_erase": 0.5,
                                                            "batch_size": 32}


def test_same_seed_same_run(tmp_path, phantom_data):
    from xray_edge.train.trainer import TrainConfig, train

    runs = [train(TrainConfig(data=phantom_data, out=tmp_path / str(i), epochs=1, verbose=0,
                              cache_dir=tmp_path / "cache", plots=False)).history for i in range(2)]
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-5)


def test_mixed_precision_trains_in_bfloat16_and_saves_float32():
    import keras

    from xray_edge.train.model import build_model
    from xray_edge.train.trainer import TrainConfig, _as_float32, backend_settings

    cfg = TrainConfig(data=None, precision="mixed_bfloat16")
    with backend_settings(cfg):
        model = build_model(2)
        assert {l.dtype_policy.name for l in model.layers} == {"mixed_bfloat16"}
        assert {v.dtype for v in model.weights} == {"float32"}
        saved = _as_float32(model, 2, cfg)
    assert {l.dtype_policy.name for l in saved.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), model.get_weights()))
    assert keras.config.dtype_policy().name == "float32"  # restored for whatever runs next


def test_unknown_precision_is_refused():
    from xray_edge.errors import XrayEdgeError
    from xray_edge.train.trainer import TrainConfig, backend_settings

    with pytest.raises(XrayEdgeError, match="precision"):
        with backend_settings(TrainConfig(data=None, precision="float16")):
            pass


def test_collapse_is_detected_and_not_saved_as_model(tmp_path, phantom_data):
    from xray_edge.train.trainer import TrainConfig, TrainingCollapsed, train

    (tmp_path / "model.keras").write_bytes(b"the previous good model")  # kept (issue #22)
    with pytest.raises(TrainingCollapsed, match="previous model.keras and its files were kept"):
        train(TrainConfig(data=phantom_data, out=tmp_path, epochs=2, learning_rate=1.0, verbose=0,
                          cache_dir=tmp_path / "cache", plots=False))
    assert (tmp_path / "model.keras").read_bytes() == b"the previous good model"
    assert (tmp_path / "model.collapsed.keras").exists()
    assert not (tmp_path / "training.json").exists() and not (tmp_path / "metrics.json").exists()
    assert json.loads((tmp_path / "training.collapsed.json").read_text())["validation"]["collapsed"] is True


def test_short_real_run_on_shared_set(shared_artifacts):
    rec = json.loads((shared_artifacts / "training.json").read_text())
    assert rec["synthetic"] is False and rec["classes"] == ["COVID19", "NORMAL"]
    assert rec["validation"]["collapsed"] is False
    assert rec["validation"]["roc_auc"] > 0.8, rec["validation"]
    m = json.loads((shared_artifacts / "metrics.json").read_text())
    assert "held out" in m["source"]  # the shared set has no test/


def test_three_classes_train_a_softmax(tmp_path, phantom_data):
    """A COVID19/NORMAL/PNEUMONIA layout gives a softmax over three labels."""
    from xray_edge.train.trainer import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(phantom_data, data)
    for split in ("train", "test"):
        src = sorted((data / split / "COVID19").glob("*.png"))
        dst = data / split / "PNEUMONIA"
        dst.mkdir()
        for p in src:  # a third class: the opacity phantoms mirrored
            Image.open(p).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(dst / p.name)
    res = train(TrainConfig(data=data, out=tmp_path / "out", epochs=1, verbose=0, plots=False,
                            cache_dir=tmp_path / "cache"))
    import keras

    model = keras.saving.load_model(res.model_path)
    assert model.outputs[0].shape[-1] == 3 and model.layers[-1].activation.__name__ == "softmax"
    assert res.metrics["classes"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert np.asarray(res.metrics["confusion_matrix"]["matrix"]).shape == (3, 3)
