"""Helpers for the service tests: a tiny real ONNX model with a manifest, DICOM films built from
real images, and `xray-edge serve` as a real process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_edge.preprocess import Preprocessing

# ../shared/data beside the checkout, as in conftest.py; XRAY_EDGE_SHARED_DATA points elsewhere
# (a git worktree whose parent folder has no shared/)
SHARED = Path(os.environ.get("XRAY_EDGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def brightness_model(folder: Path, center: float = 110.0, scale: float = 25.0,
                     validation_scores=None, threshold: float = 0.5) -> Path:
    """An artifacts folder: an ONNX model answering sigmoid((mean pixel - center) / scale) as
    P(NORMAL), with a manifest (sha256, labels, threshold, optional validation score quantiles)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from xray_edge.metrics import score_distribution

    size = Preprocessing().size
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["m"], ["f"], axis=1),
             helper.make_node("Sub", ["f", "c"], ["d"]),
             helper.make_node("Div", ["d", "s"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["prob"])]
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [center]),
             helper.make_tensor("s", TensorProto.FLOAT, [], [scale])]
    graph = helper.make_graph(nodes, "brightness", [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, size, size, 3])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "xray.onnx"
    onnx.save(model, str(path))
    data = path.read_bytes()
    op = {"threshold": threshold, "chosen_on": "test"}
    if validation_scores is not None:
        op["validation_scores"] = score_distribution(validation_scores)
    manifest = {"schema": 1, "labels": ["COVID19", "NORMAL"], "threshold": threshold, "operating_point": op,
                "input": {"shape": [1, size, size, 3], "dtype": "uint8", "preprocessing": Preprocessing().to_dict()},
                "default": "xray.onnx",
                "files": {"xray.onnx": {"format": "onnx", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def real_images(n: int, tmp: Path) -> list[Path]:
    """n real chest films (the shared set) when present, else phantom films drawn here."""
    shared = SHARED / "chest-xray-small" / "train"
    if shared.is_dir():
        files = sorted(p for d in sorted(shared.iterdir()) if d.is_dir() for p in d.iterdir() if p.is_file())
        if len(files) >= n:
            step = max(1, len(files) // n)
            return files[::step][:n]
    from xray_edge.train.phantom import generate_phantoms

    root = generate_phantoms(tmp / "phantom", n_train=max(2, (n + 1) // 2), n_test=1)
    return sorted((root / "train").rglob("*.png"))[:n]


def dicom_from_image(image: Path, out: Path, *, jpeg: bool = False, sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
                     study: str | None = None, max_side: int = 512) -> Path:
    """A DX (for presentation) DICOM file of a real image: 8-bit MONOCHROME2, uncompressed or JPEG baseline."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    im = Image.open(image).convert("L")
    im.thumbnail((max_side, max_side))
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Test^Patient", "PID-12345"
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID = generate_uid(), generate_uid(), sop_class
    ds.Modality = "DX"
    ds.Rows, ds.Columns = im.height, im.width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    if jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PixelData = np.asarray(im, dtype=np.uint8).tobytes()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(out, enforce_file_format=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`xray-edge serve ...` in its own process, its stderr collected line by line."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "xray_edge.cli", "serve", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not any(text in l for l in self.lines):
                time.sleep(0.2)
                if not any(text in l for l in self.lines):
                    raise AssertionError(f"serve exited ({self.proc.returncode}) before {text!r}: {self.lines[-10:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s: {self.lines[-10:]}")

    def stop(self, sig=15, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def results(spool: Path) -> list[dict]:
    """The well-formed lines of results.jsonl (a torn line, from a kill, is not a result)."""
    from xray_edge.serve.spool import read_results

    return list(read_results(spool / "results.jsonl"))


def wait_results(spool: Path, n: int, timeout: float = 60) -> list[dict]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = results(spool)
        if len(r) >= n:
            return r
        time.sleep(0.1)
    raise AssertionError(f"{len(results(spool))} results of {n} within {timeout} s")
