"""Hostile inputs against `classify`, `info` and `bench` (issue #11): never a traceback, never a
wrong answer. An error about one input is one line while the others go on (exit 1); an error about
the model or its manifest is one line and exit 2, before any image is read."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from edge_helpers import onnx_model, run_as_nobody, shared_tmp  # noqa: F401 - shared_tmp is a fixture
from xray_edge.inputs import walk_images


@pytest.fixture(scope="module")
def good(phantom_data) -> list[Path]:
    return sorted(walk_images(phantom_data / "test"))[:2]


def _results(r) -> list[str]:
    return [l for l in r.stdout.splitlines() if l.strip()]


def _errors(r) -> list[str]:
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


def _one_line_exit_2(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _artifacts(tiny_artifacts: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("manifest.json", "xray_int8.tflite", "xray.onnx"):
        shutil.copy(tiny_artifacts / f, dst / f)
    m = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        target = m
        *path, last = key.split(".")
        for k in path:
            target = target[k]
        target[last] = value
    (dst / "manifest.json").write_text(json.dumps(m))  # NaN is written as the literal NaN
    return dst


# ---------------------------------------------------------------- D1: one bad input, the rest go on
def test_unreachable_paths_are_error_lines_and_the_batch_goes_on(tiny_artifacts, good, shared_tmp):
    root = shared_tmp
    art = _artifacts(tiny_artifacts, root / "art")
    for f in art.iterdir():
        f.chmod(0o644)
    first, last = shutil.copy(good[0], root / "first.png"), shutil.copy(good[1], root / "last.png")
    (root / "locked").mkdir()
    shutil.copy(good[0], root / "locked" / "inside.png")
    (root / "locked").chmod(0o700)  # root's own: an ordinary user cannot enter it
    (root / "tree" / "closed").mkdir(parents=True)
    shutil.copy(good[0], root / "tree" / "open.png")
    shutil.copy(good[0], root / "tree" / "closed" / "hidden.png")
    (root / "tree" / "closed").chmod(0o700)
    (root / "tree").chmod(0o755)
    long_name = root / ("n" * 300 + ".png")
    r = run_as_nobody(["classify", "-m", art, first, root / "locked" / "inside.png", long_name,
                       root / "tree", last])
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert [Path(l.split("\t")[0]).name for l in _results(r)] == ["first.png", "open.png", "last.png"]
    errors = _errors(r)
    assert len(errors) == 3, r.stderr
    assert "inside.png" in errors[0] and "n" * 300 in errors[1] and "closed" in errors[2]


def test_unreadable_model_file_is_one_line_exit_2(tiny_artifacts, good, shared_tmp):
    root = shared_tmp
    art = _artifacts(tiny_artifacts, root / "art")
    img = shutil.copy(good[0], root / "a.png")
    (art / "manifest.json").chmod(0o644)
    (art / "xray_int8.tflite").chmod(0o600)
    msg = _one_line_exit_2(run_as_nobody(["classify", "-m", art, img]))
    assert "xray_int8.tflite" in msg and "cannot read" in msg


def test_dicom_with_non_numeric_tags_fails_alone(tiny_artifacts, good, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from test_dicom import ramp, write_dicom

    p = write_dicom(tmp_path / "odd.dcm", ramp())
    ds = pydicom.dcmread(p)
    ds.add_new(0x00281050, "LO", "abc")  # WindowCenter
    ds.add_new(0x00281051, "LO", "100")
    ds.save_as(p)
    r = run_cli("classify", "-m", tiny_artifacts, good[0], p, good[1])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(_results(r)) == 2 and len(_errors(r)) == 1 and "odd.dcm" in _errors(r)[0]


# ---------------------------------------------------------------- D1/D5: model and manifest, exit 2
MANIFEST_CASES = {
    "threshold-text": ({"threshold": "high"}, "threshold"),
    "threshold-7": ({"threshold": 7}, "threshold"),
    "threshold-nan": ({"threshold": float("nan")}, "threshold"),
    "labels-string": ({"labels": "AB"}, "labels"),
    "labels-three": ({"labels": ["COVID19", "NORMAL", "PNEUMONIA"]}, "labels"),
    "labels-swapped": ({"labels": ["NORMAL", "COVID19"]}, "differ"),
    "size-text": ({"input.preprocessing.size": "big"}, "size"),
    "size-unfit": ({"input.preprocessing.size": 64}, "input shape"),
    "channels": ({"input.preprocessing.channels": 1}, "channels"),
    "resample": ({"input.preprocessing.resample": "lanczos"}, "resample"),
    "version": ({"input.preprocessing.version": "0"}, "version"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_values_of_wrong_type_or_meaning_are_refused(tiny_artifacts, tmp_path, case):
    changes, needle = MANIFEST_CASES[case]
    art = _artifacts(tiny_artifacts, tmp_path / "a", **changes)
    # a missing image: a model error must come first, before any image is looked at
    msg = _one_line_exit_2(run_cli("classify", "-m", art, tmp_path / "never-read.png"))
    assert needle in msg, msg


@pytest.mark.parametrize("command", ["info", "bench"])
def test_info_and_bench_refuse_the_same_manifests(tiny_artifacts, tmp_path, command):
    for i, case in enumerate(("labels-swapped", "size-unfit", "channels")):
        changes, needle = MANIFEST_CASES[case]
        art = _artifacts(tiny_artifacts, tmp_path / str(i), **changes)
        extra = ["--runs", "1"] if command == "bench" else []
        assert needle in _one_line_exit_2(run_cli(command, art, *extra))


@pytest.mark.parametrize("kw,needle", [
    ({"size": 64}, "input shape"),
    ({"outputs": 3}, "3 outputs but 2 labels"),
    ({"labels": ("COVID19", "NORMAL", "PNEUMONIA")}, "1 output but 3 labels"),
])
def test_onnx_models_that_do_not_fit_their_metadata(tmp_path, good, kw, needle):
    model = onnx_model(tmp_path / "m.onnx", **kw)
    for command in (["classify", "-m", model, good[0]], ["info", model], ["bench", model, "--runs", "1"]):
        assert needle in _one_line_exit_2(run_cli(*command))


def test_float64_onnx_input_is_fed_float64(tmp_path, good):
    model = onnx_model(tmp_path / "m.onnx", dtype="float64")
    r = run_cli("classify", "-m", model, "--json", *good)
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["label"] for l in _results(r)] == ["NORMAL", "NORMAL"]  # sigmoid(mean) > 0.5
    assert run_cli("info", model).returncode == 0 and run_cli("bench", model, "--runs", "2").returncode == 0


def test_non_finite_model_output_is_an_error_not_an_answer(tmp_path, good):
    from xray_edge.preprocess import load_image

    bright = tmp_path / "bright.png"  # a brighter film (the input gate refuses a flat bright square)
    film = np.asarray(Image.open(good[0]).convert("L"), np.float32)
    Image.fromarray(np.clip(film * 0.6 + 102, 0, 255).astype(np.uint8)).save(bright)
    limit = (max(load_image(p).mean() for p in good) + load_image(bright).mean()) / 2
    model = onnx_model(tmp_path / "m.onnx", nan_above=limit)  # NaN for images brighter than that
    r = run_cli("classify", "-m", model, "--json", good[0], bright, good[1])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    rows = [_strict_json(l) for l in _results(r)]
    assert "label" in rows[0] and "non-finite" in rows[1]["error"] and "label" in rows[2]
    msg = _one_line_exit_2(run_cli("classify", "-m", onnx_model(tmp_path / "n.onnx", nan_above=-1), good[0]))
    assert "non-finite" in msg


def test_runtime_loads_the_checked_bytes_not_the_path(tiny_artifacts, tmp_path):
    from xray_edge.backends import open_backend

    for name in ("xray_int8.tflite", "xray.onnx"):
        data = (tiny_artifacts / name).read_bytes()
        be = open_backend(tmp_path / "gone" / name, content=data)  # no file there at all
        assert be.predict(np.zeros((200, 200, 3), np.uint8)).shape == (1,)


def test_nan_threshold_is_a_usage_error(tiny_artifacts, good):
    for bad in ("nan", "inf", "-0.1", "1.5"):
        r = run_cli("classify", "-m", tiny_artifacts, "--threshold", bad, good[0])
        assert r.returncode == 2 and "probability" in r.stderr and r.stdout == "", r.stderr


# ---------------------------------------------------------------- D8: output and input handling
def _strict_json(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_json_has_a_record_for_every_input(tiny_artifacts, good, tmp_path):
    r = run_cli("classify", "-m", tiny_artifacts, "--json", good[0], tmp_path / "missing.png", good[1])
    assert r.returncode == 1
    rows = [_strict_json(l) for l in _results(r)]
    assert [Path(x["path"]).name for x in rows] == [good[0].name, "missing.png", good[1].name]
    assert "label" in rows[0] and "no such file" in rows[1]["error"] and "label" in rows[2]
    assert len(_errors(r)) == 1  # and one line for people on stderr


def test_stdin_paths_keep_their_spaces_and_nul_separated_names_work(tiny_artifacts, good, tmp_path):
    spaced = shutil.copy(good[0], tmp_path / " lead.png")
    newline = shutil.copy(good[1], tmp_path / "two\nlines.png")
    r = run_cli("classify", "-m", tiny_artifacts, "-", input=f"{spaced}\r\n{good[1]}\n")
    assert r.returncode == 0, r.stderr
    assert [l.split("\t")[0] for l in _results(r)] == [str(spaced), str(good[1])]
    r = run_cli("classify", "-m", tiny_artifacts, "--json", "-0", "-", input=f"{newline}\0{spaced}\0")
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["path"] for l in _results(r)] == [str(newline), str(spaced)]


def test_empty_stdin_is_an_error_like_an_empty_folder(tiny_artifacts, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, stdin in ((["-"], ""), ([tmp_path / "empty"], None)):
        r = run_cli("classify", "-m", tiny_artifacts, *args, input=stdin)
        assert r.returncode == 1 and len(_errors(r)) == 1, r.stderr


def test_non_utf8_file_names_come_out_as_they_are(tiny_artifacts, good, tmp_path):
    raw = os.fsencode(tmp_path) + b"/scan\xff\xfe.png"
    shutil.copy(good[0], os.fsdecode(raw))
    cmd = [sys.executable, "-m", "xray_edge.cli", "classify", "-m", str(tiny_artifacts)]
    r = subprocess.run(cmd + [os.fsdecode(raw)], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\t")[0] == raw  # the bytes of the name: the file can be opened again
    r = subprocess.run(cmd + ["--json", os.fsdecode(raw)], capture_output=True)
    assert os.fsencode(json.loads(r.stdout)["path"]) == raw


def test_no_runtime_chatter_on_stderr(tiny_artifacts, good):
    r = run_cli("classify", "-m", tiny_artifacts, good[0])
    chatter = [l for l in r.stderr.splitlines() if not l.startswith("warning: this model was trained on SYNTHETIC")]
    assert r.returncode == 0 and chatter == [], r.stderr  # LiteRT's INFO line included


def test_a_closed_pipe_ends_quietly(tiny_artifacts, good):
    cmd = (f"{sys.executable} -m xray_edge.cli classify -m '{tiny_artifacts}' "
           + " ".join(f"'{good[0]}'" for _ in range(400)) + " | head -n 1; echo \"rc=${PIPESTATUS[0]}\"")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.stdout.count("\t") == 2 and "rc=0" in r.stdout, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_progress_bar_on_a_terminal_only(tiny_artifacts, phantom_data):
    folder = phantom_data / "test"
    piped = run_cli("classify", "-m", tiny_artifacts, folder)
    assert piped.returncode == 0 and "\r" not in piped.stderr
    leader, follower = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "xray_edge.cli", "classify", "-m", str(tiny_artifacts),
                            str(folder)], stdout=subprocess.PIPE, stderr=follower, timeout=300)
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    n = len(list(walk_images(folder)))
    assert p.returncode == 0 and len(p.stdout.splitlines()) == n
    assert f"{n}/{n}".encode() in seen and b"\r" in seen


def test_suffixless_dicom_in_a_folder_is_found(tiny_artifacts, tmp_path):
    pytest.importorskip("pydicom")
    from test_dicom import film, write_dicom

    write_dicom(tmp_path / "IMG0001", film())
    write_dicom(tmp_path / "1.2.840.113619.2.55", film())
    (tmp_path / "NOTES").write_text("not an image")
    r = run_cli("classify", "-m", tiny_artifacts, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(Path(l.split("\t")[0]).name for l in _results(r)) == ["1.2.840.113619.2.55", "IMG0001"]


def test_a_bad_image_named_for_bench_is_one_line(tiny_artifacts, tmp_path):
    p = tmp_path / "scan.jpg"
    p.write_bytes(b"%!PS-Adobe-3.0\nshowpage\n")
    assert "not accepted" in _one_line_exit_2(run_cli("bench", tiny_artifacts, "--runs", "1", "--image", p))


@pytest.mark.parametrize("nul", [False, True])
def test_stdin_paths_are_classified_as_they_arrive(tiny_artifacts, good, nul):
    import select

    cmd = [sys.executable, "-m", "xray_edge.cli", "classify", "-m", str(tiny_artifacts), *(["-0"] if nul else []), "-"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        p.stdin.write(os.fsencode(good[0]) + (b"\0" if nul else b"\n"))
        p.stdin.flush()  # stdin stays open: the answer must not wait for its end
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready, "no answer before stdin was closed"
        assert p.stdout.readline().split(b"\t")[0] == os.fsencode(good[0])
    finally:
        p.stdin.close()
        p.wait(timeout=120)
    assert p.returncode == 0
