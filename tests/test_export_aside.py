"""int8 quantized in a second process (`export/int8_process.py`): the same file as in-process, its
failures as one-line step errors that leave the folder unchanged, and no process left behind."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal

import pytest

from conftest import save_with_record, tiny_model
from test_export import _snapshot

CLASSES = ["COVID19", "NORMAL"]
FORMATS = ("float32", "int8", "onnx")


def _export(model, out, aside: bool, **kw):
    from xray_edge.export.pipeline import ExportConfig, run_export

    lines: list[str] = []
    cfg = ExportConfig(model=model, out=out, formats=FORMATS, int8_process=aside, **kw)
    return run_export(cfg, log=lines.append), lines


@pytest.fixture(scope="module")
def exported(tmp_path_factory, phantom_data):
    """One model exported twice: int8 quantized in this process, then in a second one."""
    root = tmp_path_factory.mktemp("aside")
    model = save_with_record(tiny_model(seed=9), root / "model", CLASSES, phantom_data)
    here, _ = _export(model, root / "here", aside=False)
    aside, lines = _export(model, root / "aside", aside=True)
    return model, root, here, aside, lines


def test_the_second_process_makes_the_same_int8_file(exported):
    _, root, here, aside, lines = exported
    assert here.passed and aside.passed
    assert any("int8, in the second process" in line for line in lines)
    for name in ("xray_int8.tflite", "xray_float32.tflite", "xray.onnx"):
        assert (root / "aside" / name).read_bytes() == (root / "here" / name).read_bytes(), name
    assert aside.manifest.calibration["images"] == here.manifest.calibration["images"] > 0
    assert list(aside.manifest.files) == list(here.manifest.files)  # in the order asked
    for result in (here, aside):
        # float32 converted once, early (int8 starts from it), and only written later
        assert {"convert float32", "write float32", "convert onnx", "prove int8"} <= set(result.timings)
        for name, entry in result.manifest.files.items():
            assert set(entry.seconds) == {"convert", "prove"} and min(entry.seconds.values()) >= 0, name
    assert "convert int8" in aside.timings  # collected from the second process as its own step
    assert not multiprocessing.active_children()


def test_while_int8_is_made_aside_the_other_proofs_take_one_core(exported, tmp_path, monkeypatch):
    from xray_edge.export import parity

    model, *_ = exported
    prove, threads = parity.prove, {}

    def recording(fmt, *args):
        threads[fmt] = args[-1]
        return prove(fmt, *args)

    monkeypatch.setattr(parity, "prove", recording)
    result, _ = _export(model, tmp_path / "out", aside=True)
    assert result.passed
    # the second core is the int8 process's until its file is back; its own proof takes every core
    assert threads == {"float32": 1, "onnx": 1, "int8": None}


def _fails_cleanly(exported, tmp_path, on_step, error: str, **kw) -> None:
    """Export over a good set with `on_step` breaking something: one-line `error`, the folder
    byte-identical, no second process left."""
    from xray_edge.export.pipeline import ExportFailed

    model, root, *_ = exported
    out = tmp_path / "out"
    shutil.copytree(root / "here", out)
    before = _snapshot(out)
    with pytest.raises(ExportFailed, match=error):
        _export(model, out, aside=True, on_step=on_step, **kw)
    assert _snapshot(out) == before
    assert not multiprocessing.active_children()


def test_a_failure_in_the_second_process_is_one_line_and_changes_nothing(exported, tmp_path, phantom_data):
    from xray_edge.export import calibration

    data = tmp_path / "data"
    shutil.copytree(phantom_data / "train", data)

    def break_calibration(step):
        # the second process decodes the calibration images from here on: none decodes
        if step == "convert float32":
            for p in calibration.image_sets(None, data, 100, 200, 0).calibration:
                p.write_bytes(b"not an image")

    _fails_cleanly(exported, tmp_path, break_calibration,
                   r"^convert int8: int8 export needs calibration images$", data=data)


def test_a_killed_second_process_is_one_line_and_changes_nothing(exported, tmp_path):
    def kill_it(step):
        # before float32 is converted the second process is waiting for it: alive, whatever the speed
        if step == "convert float32":
            (child,) = multiprocessing.active_children()
            os.kill(child.pid, signal.SIGKILL)
            child.join()

    _fails_cleanly(exported, tmp_path, kill_it,
                   r"^convert float32: the int8 process ended without a result \(exit code -9\)$")


def test_an_export_failing_elsewhere_does_not_wait_for_or_leave_the_second_process(exported, tmp_path):
    def interrupt(step):
        if step == "convert float32":
            assert multiprocessing.active_children()  # waiting for the flatbuffer
            raise RuntimeError("interrupted")

    _fails_cleanly(exported, tmp_path, interrupt, "^convert float32: interrupted$")


def test_float32_dense_weights_need_no_transpose(phantom_data):
    """The Dense kernel is handed over as TFLite stores it, so no TRANSPOSE is folded (seconds
    for a large Dense) and none is left in the file."""
    from tensorflow.lite.python import schema_py_generated as schema

    from xray_edge.export import tflite
    from xray_edge.export.ranges import has_lstm

    flat = tflite.convert_float32(tiny_model(seed=9))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(flat, 0)
    ops = {names[max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())]
           for i in range(model.OperatorCodesLength())}
    assert "FULLY_CONNECTED" in ops and "TRANSPOSE" not in ops, ops
    assert not has_lstm(flat)


def test_huge_pages_join_the_users_tunables_and_keep_their_choice():
    from xray_edge.export.int8_process import with_huge_pages

    assert with_huge_pages(None) == with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert with_huge_pages("glibc.malloc.check=0") == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert with_huge_pages("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
