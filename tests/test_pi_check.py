"""The host-vs-Pi comparison of tests/tools/emulated_pi.py fails on any difference it exists to catch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("pi_test", Path(__file__).parent / "tools" / "emulated_pi.py")
pi_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pi_test)


def result(raw, dtype="uint8", machine="aarch64", tf=False):
    return {"machine": machine, "tensorflow_installed": tf, "dtype": dtype, "raw": raw}


def test_identical_int8_outputs_pass():
    assert pi_test.compare(result([[97], [86]]), result([[97], [86]])) == []


def test_one_int8_step_fails():
    # qemu's default CPU model `max` gave [172] for every image under LiteRT int8
    problems = pi_test.compare(result([[97], [86]]), result([[97], [87]]))
    assert problems and "image 1" in problems[0]


def test_float_tolerance():
    host = result([[0.25]], dtype="float32")
    assert pi_test.compare(host, result([[0.25 + 5e-6]], dtype="float32")) == []
    assert pi_test.compare(host, result([[0.25 + 5e-5]], dtype="float32"))


def test_wrong_machine_or_tensorflow_present_fails():
    assert pi_test.compare(result([[1]]), result([[1]], machine="x86_64"))
    assert pi_test.compare(result([[1]]), result([[1]], tf=True))
