"""Second hardening pass (issue #22): special files, deep JSON, writes that fail, JSON without NaN,
interrupted and concurrent training, the GPU machine's path.

Commands run in a subprocess with a timeout, so a regression that blocks on a FIFO fails the test
instead of hanging the suite. Models are tiny hand-built ONNX files (no TensorFlow), except where
a TFLite file's appended metadata is the subject.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_helpers import onnx_model, run_as_nobody, shared_tmp  # noqa: F401 - shared_tmp is a fixture
from test_edge_hostile import _one_line_exit_2 as one_line_exit_2
from xray_edge.errors import XrayEdgeError
from xray_edge.files import MAX_JSON_DEPTH, parse_json, read_regular
from xray_edge.training_record import TrainingRecord

TIMEOUT = 90  # seconds: far above a normal run, far below a hang


def cli(*args, input: str | None = None, env=None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "xray_edge.cli", *map(str, args)], capture_output=True,
                              text=True, input=input, env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"xray-edge {' '.join(map(str, args))} hung (killed after {timeout} s)")


def errors(r) -> list[str]:
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


def deep(n: int) -> str:
    return "[" * n + "]" * n


def _film(path: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """A phantom chest film (what the input gate accepts), its grey scaled by `scale`."""
    from xray_edge.train.phantom import phantom_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grey = phantom_image(np.random.default_rng(seed), False).astype(np.float32) * scale
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def scan(tmp_path) -> Path:
    return _film(tmp_path / "scan.png")


FILM_MEAN = 75.0  # phantom films' mean grey is 76-94; darkened by 0.8, 61-76


@pytest.fixture
def model(tmp_path) -> Path:
    """A lone ONNX file with its metadata embedded, in its own folder: P(NORMAL) rises with the
    mean grey around that of a phantom film."""
    folder = tmp_path / "model"
    folder.mkdir()
    return onnx_model(folder / "tiny.onnx", center=FILM_MEAN)


# ---------------------------------------------------------------- special files
def test_fifo_named_as_a_model_file_is_refused_in_one_line(tmp_path, scan):
    for name in ("model.onnx", "model.tflite"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        msg = one_line_exit_2(cli("classify", "-m", fifo, scan))
        # a .tflite may be refused earlier for want of its runtime; never by blocking
        assert "FIFO" in msg or "runtime" in msg.lower() or "install" in msg, msg
        assert "FIFO" in one_line_exit_2(cli("info", fifo)) or name.endswith(".tflite")


def test_fifo_named_manifest_or_site_json_is_refused_in_one_line(tmp_path, model, scan):
    os.mkfifo(model.parent / "site.json")
    msg = one_line_exit_2(cli("classify", "-m", model, scan))
    assert "site.json" in msg and "not a regular file (a FIFO)" in msg
    (model.parent / "site.json").unlink()
    os.mkfifo(model.parent / "manifest.json")
    for args in (["classify", "-m", model, scan], ["info", model], ["classify", "-m", model.parent, scan]):
        msg = one_line_exit_2(cli(*args))
        assert "manifest.json" in msg and "FIFO" in msg, msg


def test_special_files_among_inputs_are_error_lines_and_the_rest_go_on(tmp_path, model, scan):
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(scan, folder / "a.png")
    os.mkfifo(folder / "b")  # no suffix: would be sniffed for a DICOM preamble
    os.mkfifo(folder / "c.png")
    (folder / "d").symlink_to("/dev/zero")  # endless
    (folder / "e.png").symlink_to("/dev/zero")
    shutil.copy(scan, folder / "f.png")
    os.mkfifo(tmp_path / "named")
    r = cli("classify", "-m", model, folder, tmp_path / "named", tmp_path / "g*")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert [Path(l.split("\t")[0]).name for l in r.stdout.splitlines()] == ["a.png", "f.png"]
    errs = errors(r)
    assert len(errs) == 6, errs  # b, c.png, d, e.png, named, and the empty pattern
    assert sum("FIFO" in e for e in errs) == 3 and sum("character device" in e for e in errs) == 2


def test_fifo_in_an_artifacts_folder_under_the_default_name_is_refused(model, scan):
    (model.parent / "manifest.json").write_text(json.dumps({
        "schema": 1, "labels": ["COVID19", "NORMAL"], "threshold": 0.5, "default": "x.onnx",
        "files": {"x.onnx": {"format": "onnx", "sha256": "0" * 64, "size": 1}}}))
    os.mkfifo(model.parent / "x.onnx")
    assert "x.onnx" in (msg := one_line_exit_2(cli("classify", "-m", model.parent, scan))) and "FIFO" in msg


def test_symlink_to_an_endless_device_as_model_is_refused(tmp_path, scan):
    link = tmp_path / "model.onnx"
    link.symlink_to("/dev/zero")
    assert "character device" in one_line_exit_2(cli("classify", "-m", link, scan))


def test_read_regular_bounds_the_size(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 101)
    with pytest.raises(OSError, match="over the 100-byte limit"):
        read_regular(p, 100)
    assert read_regular(p, 101) == b" " * 101


# ---------------------------------------------------------------- JSON too deep
def test_parse_json_bounds_depth_and_ignores_brackets_in_strings():
    assert parse_json(deep(MAX_JSON_DEPTH)) == json.loads(deep(MAX_JSON_DEPTH))
    with pytest.raises(ValueError, match="nested 100000 levels"):
        parse_json(deep(100_000))
    assert parse_json('{"a": "[[[[\\"[[[[" }', max_depth=1) == {"a": '[[[["[[[['}


def test_deep_site_json_is_one_line_exit_2(model, scan):
    (model.parent / "site.json").write_text('{"schema": 1, "x": ' + deep(50_000) + "}")
    assert "site.json" in one_line_exit_2(cli("classify", "-m", model, scan))


def test_deep_manifest_is_one_line_exit_2(model, scan):
    (model.parent / "manifest.json").write_text(deep(50_000))
    for args in (["classify", "-m", model.parent, scan], ["info", model.parent]):
        assert "nested" in one_line_exit_2(cli(*args))


def test_deep_metadata_in_an_onnx_file_is_one_line_exit_2(tmp_path, scan):
    onnx = pytest.importorskip("onnx")
    path = onnx_model(tmp_path / "deep.onnx")
    m = onnx.load(str(path))
    m.metadata_props[0].value = '{"labels": ["A", "B"], "x": ' + deep(50_000) + "}"
    onnx.save(m, str(path))
    for args in (["classify", "-m", path, scan], ["info", path]):
        msg = one_line_exit_2(cli(*args))
        assert "embedded metadata" in msg and "nested" in msg, msg


def test_deep_metadata_appended_to_a_tflite_file_is_one_line_exit_2(tiny_artifacts, tmp_path, scan):
    data = (tiny_artifacts / "xray_float32.tflite").read_bytes()
    end = data.rfind(b"PK\x05\x06")  # the appended zip's end record: cut the zip off
    start = data.rfind(b"PK\x03\x04", 0, end)
    path = tmp_path / "deep.tflite"
    path.write_bytes(_with_raw_metadata(data[:start], deep(50_000)))
    r = cli("info", path)
    if "install" in r.stderr and "runtime" in r.stderr.lower():
        pytest.skip("no TFLite runtime here")
    assert "nested" in one_line_exit_2(r)
    assert "nested" in one_line_exit_2(cli("classify", "-m", path, scan))


def _with_raw_metadata(flatbuffer: bytes, text: str) -> bytes:
    import io
    import zipfile

    from xray_edge.metadata import TFLITE_MEMBER

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(TFLITE_MEMBER, text)
    return flatbuffer + buf.getvalue()


def test_deep_training_json_is_one_line(tmp_path):
    (tmp_path / "training.json").write_text('{"classes": ["A", "B"], "x": ' + deep(50_000) + "}")
    with pytest.raises(XrayEdgeError, match="nested"):
        TrainingRecord.read(tmp_path)
    (tmp_path / "training.json").unlink()
    os.mkfifo(tmp_path / "training.json")
    with pytest.raises(XrayEdgeError, match="FIFO"):
        TrainingRecord.read(tmp_path)


# ---------------------------------------------------------------- writes that fail
def _grey(path: Path, value: int, size=(220, 260)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


def _site(root: Path, separable: bool = True, extra: str | None = None) -> Path:
    """SITE/<class>/*: the tiny model's P(NORMAL) is the sigmoid of the mean grey, so darker
    COVID19 films rank below NORMAL ones (ROC AUC 1), or the same films in both classes
    (ROC AUC 0.5)."""
    for i in range(12):
        _film(root / "COVID19" / f"c{i}.png", i, 0.8 if separable else 1.0)  # darker: lower P(NORMAL)
        _film(root / "NORMAL" / f"n{i}.png", i)
    if extra:
        _film(root / extra / "x.png", 99)
    return root


def test_calibrate_where_site_json_cannot_be_written_is_one_line_before_any_work(model, tmp_path):
    site = _site(tmp_path / "site")
    (model.parent / "site.json").mkdir()
    msg = one_line_exit_2(cli("calibrate", "-m", model, "--data", site))
    assert "site.json" in msg and "folder" in msg, msg
    assert "site images" not in msg


def _nobody(shared_tmp: Path, args: list) -> subprocess.CompletedProcess:
    """As the unprivileged user, with a home it can write (onnxruntime keeps an id there, and
    says so on stderr when it cannot)."""
    home = shared_tmp / "home"
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    return run_as_nobody(args, env={**os.environ, "HOME": str(home)})


def test_calibrate_in_a_read_only_folder_is_one_line(shared_tmp):
    # root writes anywhere: the unprivileged user meets the read-only folder
    folder = shared_tmp / "model"
    folder.mkdir(mode=0o755)
    model = onnx_model(folder / "tiny.onnx")
    model.chmod(0o644)
    site = _site(shared_tmp / "site")
    for p in site.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    msg = one_line_exit_2(_nobody(shared_tmp, ["calibrate", "-m", model, "--data", site]))
    assert "site.json" in msg and "Permission denied" in msg, msg
    assert not (folder / "site.json").exists()


def test_calibrate_warns_of_extra_folders_and_refuses_a_site_it_cannot_rank(model, tmp_path):
    site = _site(tmp_path / "site", extra="PNEUMONIA")
    r = cli("calibrate", "-m", model, "--data", site)
    assert r.returncode == 0, r.stderr
    assert "warning: ignored folders" in r.stderr and "PNEUMONIA" in r.stderr
    assert json.loads((model.parent / "site.json").read_text())["ignored"] == ["PNEUMONIA"]
    (model.parent / "site.json").unlink()
    flat = _site(tmp_path / "flat", separable=False)
    msg = one_line_exit_2(cli("calibrate", "-m", model, "--data", flat))
    assert "ROC AUC 0.50" in msg and not (model.parent / "site.json").exists()


def test_explain_out_under_a_file_is_one_line_exit_2(model, scan, tmp_path):
    (tmp_path / "afile").write_text("x")
    msg = one_line_exit_2(cli("explain", "-m", model, scan, "--out", tmp_path / "afile" / "sub"))
    assert "cannot write" in msg


def test_explain_in_a_read_only_folder_is_one_line(shared_tmp, scan):
    model = onnx_model(shared_tmp / "tiny.onnx")
    model.chmod(0o644)
    img = shutil.copy(scan, shared_tmp / "scan.png")
    os.chmod(img, 0o644)
    (shared_tmp / "out").mkdir(mode=0o755)
    msg = one_line_exit_2(_nobody(shared_tmp, ["explain", "-m", model, img, "--out", shared_tmp / "out"]))
    assert "Permission denied" in msg


def test_explain_of_a_long_name_fits_the_file_system_and_the_next_input_goes_on(model, scan, tmp_path):
    long = shutil.copy(scan, tmp_path / ("n" * 250 + ".png"))  # a valid name: 254 bytes
    r = cli("explain", "-m", model, long, scan, "--out", tmp_path / "out", "--grid", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [Path(x["path"]).name for x in rows] == [long.name, "scan.png"]
    assert all(Path(x["png"]).is_file() and len(Path(x["png"]).name) <= 255 for x in rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(Path(x["png"]).name for x in rows)


# ---------------------------------------------------------------- JSON and exit codes
def _strict(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_explain_of_a_uniform_image_has_no_nan(model, tmp_path):
    # the input gate refuses a uniform image before explain sees it, so this goes through the
    # library with the plain loader: no patch changes the score, and no NaN comes of it
    from xray_edge import explain as ex
    from xray_edge.model import open_model
    from xray_edge.preprocess import load_image

    flat = _grey(tmp_path / "flat.png", 100)
    loaded = open_model(model)
    (done,) = ex.explain_paths([flat], loaded.backend.predict, loaded.info, None, tmp_path,
                               ex.Occlusion(grid=2), load=load_image)
    d = _strict(json.dumps(done.to_dict(), allow_nan=False))
    assert d["frame_share"] is None and "no patch" in d["frame_share_note"]
    with Image.open(d["png"]) as im:
        text = dict(im.text)
    assert _strict(text["xray_edge_explain"])["frame_share"] is None
    assert "nan" not in text["caption"].lower() and "frame share n/a" in text["caption"]


def test_explain_json_has_a_record_for_a_failed_input(model, scan, tmp_path):
    r = cli("explain", "-m", model, tmp_path / "missing.png", scan, "--out", tmp_path / "out",
            "--grid", "2", "--json")
    assert r.returncode == 1
    rows = [_strict(l) for l in r.stdout.splitlines()]
    assert "no such file" in rows[0]["error"] and rows[1]["label"]
    assert len(errors(r)) == 1


def test_explain_into_a_closed_pipe_exits_0_like_classify(model, scan, tmp_path):
    cmd = (f"{sys.executable} -m xray_edge.cli explain -m '{model}' --grid 2 --out '{tmp_path / 'out'}' "
           + " ".join(f"'{scan}'" for _ in range(60)) + " | head -n 1; echo \"rc=${PIPESTATUS[0]}\"")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "rc=0" in r.stdout and r.stdout.count("\t") == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# ---------------------------------------------------------------- concurrent trainings, one cache
DECODE = """
import sys
from pathlib import Path
from xray_edge.preprocess import Preprocessing
from xray_edge.train.cache import decode_to_store

paths = sorted(Path(sys.argv[1]).glob("*.png"))
d = decode_to_store(paths, Preprocessing(size=24), Path(sys.argv[2]), workers=1, log=print)
print("rows", len(d.ok))
"""


def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(1, 256, (40, 50), np.uint8)).save(folder / f"i{i:03d}.png")
    return sorted(folder.glob("*.png"))


def _decode_proc(images: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DECODE, str(images), str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_decode_of_the_same_images_waits_for_the_first(tmp_path):
    import fcntl

    from xray_edge.preprocess import Preprocessing, load_image
    from xray_edge.train.cache import cache_key

    paths = _pngs(tmp_path / "img", 20)
    spec = Preprocessing(size=24)
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f"{cache_key(paths, spec)}.lock"
    with open(lock, "w") as held:  # this test plays the first training, mid-decode
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = _decode_proc(tmp_path / "img", cache)
        line = proc.stdout.readline()
        assert "waiting for another training" in line, (line, proc.stderr.read() if proc.poll() else "")
        assert proc.poll() is None
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and "rows 20" in out, err


def test_two_trainings_decoding_together_both_succeed_with_every_row(tmp_path):
    from xray_edge.preprocess import Preprocessing, load_image
    from xray_edge.train.cache import decode_to_store

    paths = _pngs(tmp_path / "img", 150)
    cache = tmp_path / "cache"
    procs = [_decode_proc(tmp_path / "img", cache) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT * 2)
        assert p.returncode == 0 and "rows 150" in out, err
    spec = Preprocessing(size=24)
    d = decode_to_store(paths, spec, cache, workers=1)
    assert np.array_equal(d.store.read(d.ok), np.stack([load_image(p, spec) for p in paths]))
    assert not list(cache.glob("*.partial.npy"))


def test_a_store_replaced_behind_its_state_is_decoded_again(tmp_path):
    from xray_edge.preprocess import Preprocessing, load_image
    from xray_edge.train.cache import decode_to_store

    paths = _pngs(tmp_path / "img", 16)
    spec = Preprocessing(size=24)
    first = decode_to_store(paths, spec, tmp_path / "cache", workers=1)
    final = first.store.path
    first.store.close()
    # another file under the final name (what a concurrent writer could leave): all black
    black = np.lib.format.open_memmap(tmp_path / "black.npy", mode="w+", dtype=np.uint8,
                                      shape=(16, *spec.shape))
    del black
    os.replace(tmp_path / "black.npy", final)
    lines = []
    d = decode_to_store(paths, spec, tmp_path / "cache", workers=1, log=lines.append)
    assert not any("from cache" in s for s in lines)
    assert np.array_equal(d.store.read(d.ok), np.stack([load_image(p, spec) for p in paths]))


# ---------------------------------------------------------------- training's outputs
def test_an_error_while_the_cache_folder_is_in_use_is_that_error(tmp_path):
    from xray_edge.train.trainer import _store_folder

    with pytest.raises(OSError, match="disk full"):  # was: generator didn't stop after throw()
        with _store_folder(tmp_path / "cache", lambda s: None):
            raise OSError(28, "disk full")


def test_train_out_that_cannot_be_written_is_one_line_before_training(tmp_path, phantom_data):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        r = cli("train", "--data", phantom_data, "--out", out, "--epochs", "1",
                "--cache-dir", tmp_path / "cache", timeout=300)
        msg = one_line_exit_2(r)
        assert "--out" in msg and "generator" not in r.stderr, msg
        assert not (tmp_path / "cache").exists()  # refused before a single image was decoded


def test_train_json_is_only_json_without_nan_on_a_one_class_test_split(tmp_path, phantom_data):
    data = tmp_path / "data"
    shutil.copytree(phantom_data, data)
    shutil.rmtree(data / "test" / "NORMAL")
    out = tmp_path / "out"
    r = cli("train", "--data", data, "--out", out, "--epochs", "1", "--json",
            "--cache-dir", tmp_path / "cache", timeout=600)
    assert r.returncode == 0, r.stderr
    m = _strict(r.stdout)  # the whole of stdout is one JSON document: no Keras progress in it
    assert m["roc_auc"] is None and "one class" in m["roc_auc_note"]
    assert m["specificity"]["value"] is None and m["sensitivity"]["value"] is not None
    assert _strict((out / "metrics.json").read_text()) == m
    config = _strict((out / "training.json").read_text())["config"]
    # --data: the real-film recipe of the study, recorded (docs/training.md)
    assert (config["batch_size"], config["photometric"], config["border"]) == (8, 0.3, 0.5)
    assert "Epoch 1/1" in r.stderr or "step" in r.stderr  # the progress went to stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.keras", "history.json", "metrics.json", "training.png", "samples.png", "training.json"])


PUBLISH = """
import os, signal, sys
from pathlib import Path
from xray_edge.train.outputs import TrainOutputs
from xray_edge.training_record import TrainingRecord
from xray_edge.files import sha256_file

out, kill_at = Path(sys.argv[1]), sys.argv[2]

def before(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

staged = TrainOutputs(out, before=before)
for name in ("model.keras", "history.json", "metrics.json", "training.png", "samples.png"):
    staged.path(name).write_bytes(b"new " + name.encode())
record = TrainingRecord(classes=["A", "B"], model_sha256=sha256_file(staged.path("model.keras")))
staged.publish(record)
"""


def _old_set(out: Path) -> dict[str, bytes]:
    from xray_edge.files import sha256_file

    out.mkdir()
    for name in ("model.keras", "history.json", "metrics.json", "training.png", "samples.png", "roc.png",
                 "manifest.json"):
        (out / name).write_bytes(b"old " + name.encode())
    TrainingRecord(classes=["A", "B"], model_sha256=sha256_file(out / "model.keras")).write(out)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_training_killed_while_publishing_never_leaves_a_mixed_set(tmp_path):
    steps = ["place model.keras", "place metrics.json", "remove roc.png", "place training.json", "never"]
    for kill_at in steps:
        out = tmp_path / kill_at.replace(" ", "_")
        old = _old_set(out)
        r = subprocess.run([sys.executable, "-c", PUBLISH, str(out), kill_at], capture_output=True,
                           text=True, timeout=TIMEOUT)
        done = kill_at == "never"
        assert r.returncode == (0 if done else -9), (kill_at, r.stderr)
        now = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert now["manifest.json"] == old["manifest.json"]  # not training's: never touched
        if done:
            assert now["model.keras"] == b"new model.keras" and "roc.png" not in now
            assert TrainingRecord.read(out).model_sha256 is not None
            assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
        elif kill_at == "place model.keras":
            assert now == old  # nothing had moved yet
        else:  # the new model beside the old record: the record refuses it, never a silent mix
            with pytest.raises(XrayEdgeError, match="interrupted training"):
                TrainingRecord.read(out)
        if not done:
            from xray_edge.train.outputs import PREFIX, TrainOutputs

            assert list(out.glob(f"{PREFIX}*"))  # the killed run's staging folder, with its files
            TrainOutputs(out).discard()  # the next run removes it
            assert not list(out.glob(f"{PREFIX}*"))


# ---------------------------------------------------------------- the GPU machine's path (no GPU)
H100 = "NVIDIA H100 80GB HBM3"


def _smi(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return folder


def test_failing_cuda_plugin_is_one_line_with_a_fix_that_is_not_the_same_install(tmp_path):
    pytest.importorskip("jax")
    site = tmp_path / "site"
    plugin = site / "jax_plugins" / "xray_edge_broken_cuda"  # found by JAX's namespace scan
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(
        "def initialize():\n"
        "    raise RuntimeError('libcuda.so.1: cannot open shared object file: No such file or directory')\n")
    dist = site / "jax_cuda13_plugin-0.7.0.dist-info"  # what pip leaves: "the plugin is installed"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda13-plugin\nVersion: 0.7.0\n")
    code = ("from xray_edge.train.device import Gpu, training_devices, unused_gpu_warning\n"
            f"print(unused_gpu_warning([Gpu({H100!r}, '580.65.06')], training_devices(1)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "libcuda" not in r.stderr, r.stderr  # said once, below
    line = r.stdout.strip()
    assert "\n" not in line and line.startswith("warning:")
    assert "did not start (RuntimeError: libcuda.so.1: cannot open shared object file" in line, line
    assert "--force-reinstall 'xray-edge[gpu-cuda13]'" in line and "make train" not in line, line


def _make_gpu(tmp_path: Path, smi: Path) -> subprocess.CompletedProcess:
    """`make` of the GPU step in a stand-in environment: its python is this one, already installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (venv / "bin" / "python").chmod(0o755)
        (venv / "bin" / ".installed").touch()
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["make", "-s", "-C", str(root), f"VENV={venv}", f"{venv}/bin/.gpu"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{smi}{os.pathsep}{os.environ['PATH']}"})


def test_gpu_step_is_redone_when_nvidia_smi_answers_otherwise(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    smi = _smi(tmp_path / "bin", f"echo '{H100}, '$(cat {tmp_path}/driver)")
    stamp = tmp_path / "venv" / "bin" / ".gpu"
    (tmp_path / "driver").write_text("470.82.01")  # too old for JAX's CUDA wheels: nothing installed
    r = _make_gpu(tmp_path, smi)
    assert r.returncode == 0 and "older than JAX's CUDA wheels need" in r.stderr, r.stderr
    first = stamp.stat().st_mtime_ns
    r = _make_gpu(tmp_path, smi)
    assert r.returncode == 0 and r.stderr == "" and stamp.stat().st_mtime_ns == first  # same answer
    (tmp_path / "driver").write_text("480.10")  # a driver update: the step is done again
    r = _make_gpu(tmp_path, smi)
    assert r.returncode == 0 and "480.10" in r.stderr and stamp.stat().st_mtime_ns > first, r.stderr


def test_hanging_or_failing_nvidia_smi_is_bounded_and_said_in_one_line(tmp_path):
    from xray_edge.train.device import SMI_TIMEOUT

    for body, said in (("exec sleep 60", f"did not answer within {SMI_TIMEOUT:g} s"),
                       ("echo 'NVIDIA-SMI has failed because it could not communicate'; exit 9",
                        "failed (exit 9): NVIDIA-SMI has failed")):
        smi = _smi(tmp_path / said.split()[0], body)
        r = subprocess.run([sys.executable, "-m", "xray_edge.train.device", "--pip-extra"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PATH": f"{smi}{os.pathsep}{os.environ['PATH']}"})
        assert r.returncode == 0 and r.stdout == "", r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning:") and said in lines[0], r.stderr


def test_nvidia_smi_is_asked_once_per_process(tmp_path, monkeypatch):
    from xray_edge.train import device

    calls = tmp_path / "calls"
    smi = _smi(tmp_path / "bin", f"echo x >> {calls}; echo '{H100}, 580.65.06'")
    monkeypatch.setenv("PATH", str(smi))
    assert device.visible_gpus() == device.visible_gpus() == [device.Gpu(H100, "580.65.06")]
    assert device.query_gpus().gpus and calls.read_text().count("x") == 1


def test_the_download_size_is_said_before_the_extra_is_installed(tmp_path):
    smi = _smi(tmp_path / "bin", f"echo '{H100}, 580.65.06'")
    r = subprocess.run([sys.executable, "-m", "xray_edge.train.device", "--pip-extra"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PATH": f"{smi}{os.pathsep}{os.environ['PATH']}"})
    assert r.stdout.strip() == "gpu-cuda13" and "about 2.5 GB" in r.stderr


# ---------------------------------------------------------------- notes of the same pass
def test_export_of_a_model_whose_outputs_do_not_fit_its_classes_is_one_line(tmp_path, phantom_data):
    pytest.importorskip("tensorflow")
    from xray_edge.train.testing import save_with_record, tiny_model

    model = save_with_record(tiny_model(num_classes=3), tmp_path / "art", ["COVID19", "NORMAL"], phantom_data)
    r = cli("export", "--model", model, "--formats", "float32", timeout=300)
    msg = [l for l in r.stderr.splitlines() if l.lower().startswith("error")]
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert len(msg) == 1 and "has 3 outputs" in msg[0] and "2 classes" in msg[0], r.stderr
    assert "tuple index" not in r.stderr and not (tmp_path / "art" / "manifest.json").exists()


def test_info_shows_the_threshold_classify_uses(model, tmp_path):
    site = _site(tmp_path / "site")
    assert cli("calibrate", "-m", model, "--data", site).returncode == 0
    d = json.loads(cli("info", model, "--json").stdout)
    c = json.loads(cli("classify", "-m", model, "--json", site / "NORMAL" / "n0.png").stdout)
    assert d["threshold"] == c["threshold"] and d["threshold_source"] == c["threshold_source"] == "site.json"
    assert d["threshold"] != 0.5 and d["model_file_threshold"] == 0.5  # the file's own, for comparison
