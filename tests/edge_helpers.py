"""Helpers for the edge hardening tests: an unprivileged runner and tiny hand-built ONNX models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp():
    """A fresh folder the unprivileged user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="xray-edge-nobody-"))
    folder.chmod(0o755)
    yield folder
    for sub in folder.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


def run_as_nobody(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `python -m xray_edge.cli ARGS` as an ordinary user (root reads every file)."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    probe = subprocess.run([*prefix, sys.executable, "-c", "import xray_edge.cli"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run the tool here: {probe.stderr[-200:]}")
    return subprocess.run([*prefix, sys.executable, "-m", "xray_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)


def onnx_model(path: Path, *, outputs: int = 1, size: int = 200, dtype: str = "uint8",
               labels=("COVID19", "NORMAL"), preprocessing: dict | None = None,
               nan_above: float | None = None, center: float | None = None) -> Path:
    """A tiny real ONNX classifier: the mean of the image through a sigmoid (or a softmax over
    the channel means when `outputs` > 1), with the project's metadata embedded. With
    `nan_above`, a sigmoid model answers NaN for images brighter than that mean (sqrt of a
    negative number). With `center`, the sigmoid is of (mean - center) / 10, so films of
    ordinary brightness do not all score 1.0."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from xray_edge.preprocess import Preprocessing

    elem = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[dtype]
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT)]
    if outputs == 1:
        nodes += [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1),
                  helper.make_node("Flatten", ["m"], ["f"], axis=1)]
        if nan_above is not None:
            nodes += [helper.make_node("Sub", ["limit", "f"], ["d"]),
                      helper.make_node("Sqrt", ["d"], ["g"]),
                      helper.make_node("Sigmoid", ["g"], ["prob"])]
        elif center is not None:
            nodes += [helper.make_node("Sub", ["f", "center"], ["c"]),
                      helper.make_node("Div", ["c", "spread"], ["z"]),
                      helper.make_node("Sigmoid", ["z"], ["prob"])]
        else:
            nodes += [helper.make_node("Sigmoid", ["f"], ["prob"])]
    else:
        nodes += [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
                  helper.make_node("Tile", ["m", "reps"], ["t"]),
                  helper.make_node("Slice", ["t", "starts", "ends", "axes"], ["s"]),
                  helper.make_node("Softmax", ["s"], ["prob"], axis=1)]
    inits = [helper.make_tensor("limit", TensorProto.FLOAT, [], [nan_above])] if nan_above is not None else []
    if center is not None:
        inits += [helper.make_tensor("center", TensorProto.FLOAT, [], [center]),
                  helper.make_tensor("spread", TensorProto.FLOAT, [], [10.0])]
    inits += [] if outputs == 1 else [
        helper.make_tensor("reps", TensorProto.INT64, [2], [1, outputs]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [outputs]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", elem, [1, size, size, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, outputs])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"labels": list(labels), "threshold": 0.5 if outputs == 1 else None,
            "preprocessing": preprocessing or Preprocessing().to_dict(), "format": "onnx"}
    helper.set_model_props(model, {"xray_edge": json.dumps(meta)})
    onnx.save(model, str(path))
    return path
