"""All or nothing: an export interrupted at any step leaves the folder one consistent set."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_with_record, tiny_model
from test_export import _snapshot

CLASSES = ["COVID19", "NORMAL"]
TRAINING_FILES = {"model.keras", "training.json"}


class Interrupted(Exception):
    pass


def _export(model: Path, out: Path, formats, on_step=None):
    from xray_edge.export.pipeline import ExportConfig, run_export

    cfg = ExportConfig(model=model, out=out, formats=tuple(formats), threshold=0.5, on_step=on_step)
    return run_export(cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, phantom_data):
    """An 'old' exported set (three formats) and a different 'new' model, each in its folder."""
    root = tmp_path_factory.mktemp("atomic")
    old = save_with_record(tiny_model(seed=9), root / "old", CLASSES, phantom_data)
    assert _export(old, old.parent, ("float32", "int8", "onnx")).passed
    new = save_with_record(tiny_model(seed=5), root / "new", CLASSES, phantom_data)
    steps: list[str] = []
    assert _export(new, root / "new-set", ("float32", "onnx"), on_step=steps.append).passed
    return old.parent, new, root / "new-set", steps


def assert_one_consistent_set(folder: Path) -> set[str]:
    """What a device copying `folder` now would get: every file the manifest lists either loads
    in the edge runner and belongs to the manifest's model, or is refused; none is a mix.
    Returns the names the runner accepts."""
    from xray_edge.errors import ModelError
    from xray_edge.manifest import MANIFEST_NAME, read_manifest
    from xray_edge.metadata import parse_onnx_metadata, read_tflite_metadata
    from xray_edge.model import open_model

    manifest = read_manifest(folder / MANIFEST_NAME)
    accepted = set()
    for name in manifest.files:
        try:
            loaded = open_model(folder, name)
        except ModelError:
            continue  # a replaced or removed file is refused, never used with the wrong labels
        path = folder / name
        embedded = (parse_onnx_metadata(loaded.backend.metadata, path) if name.endswith(".onnx")
                    else read_tflite_metadata(path))
        assert embedded["source_model_sha256"] == manifest.source_model["sha256"], name
        accepted.add(name)
    return accepted


def test_every_step_of_the_export_can_fail_without_changing_the_folder(two_models, tmp_path):
    old_folder, new_model, _, steps = two_models
    pre_publish = steps[:steps.index("publish") + 1]  # load model ... publish (before any rename)
    assert [s for s in pre_publish if s.startswith("convert")] == ["convert float32", "convert onnx"]
    for step in pre_publish:
        out = tmp_path / step.replace(" ", "-")
        shutil.copytree(old_folder, out)
        before = _snapshot(out)

        def interrupt(name, step=step):
            if name == step:
                raise Interrupted(step)

        from xray_edge.export.pipeline import ExportFailed

        with pytest.raises(ExportFailed, match=f"^{step}: {step}$") as failed:
            _export(new_model, out, ("float32", "onnx"), on_step=interrupt)
        assert not failed.value.partial
        assert _snapshot(out) == before, step  # no staging folder left either
        assert assert_one_consistent_set(out) == {"xray_float32.tflite", "xray_int8.tflite", "xray.onnx"}


def test_a_failure_between_renames_is_reported_as_partial(two_models, tmp_path):
    from xray_edge.export.pipeline import ExportFailed

    old_folder, new_model, _, _ = two_models
    out = tmp_path / "out"
    shutil.copytree(old_folder, out)

    def interrupt(name):
        if name == "place xray.onnx":
            raise Interrupted(name)

    with pytest.raises(ExportFailed, match="^publish: place xray.onnx$") as failed:
        _export(new_model, out, ("float32", "onnx"), on_step=interrupt)
    assert failed.value.partial
    # the one file already placed is refused; the old set's other files still serve
    assert assert_one_consistent_set(out) == {"xray_int8.tflite", "xray.onnx"}


KILL = """
import os, shutil, signal, sys
from pathlib import Path
from xray_edge.export.staging import Staging
from xray_edge.export.formats import FORMATS
from xray_edge.manifest import read_manifest

out, new_set, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def before(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

stage = Staging(out, before=before)
manifest = read_manifest(new_set / "manifest.json")
for name in manifest.files:
    shutil.copy(new_set / name, stage.path(name))
stage.publish(manifest, owned=[f.file for f in FORMATS.values()])
"""


def test_killed_between_renames_the_folder_is_never_a_mix(two_models, tmp_path):
    """SIGKILL before each rename of the publish step, in a real process."""
    from xray_edge.export.staging import Staging

    old_folder, _, new_set, _ = two_models
    old_manifest = (old_folder / "manifest.json").read_bytes()
    renames = ["place xray_float32.tflite", "place xray.onnx", "remove xray_int8.tflite",
               "place manifest.json", "never: completes"]
    for kill_at in renames:
        out = tmp_path / kill_at.split()[-1]
        shutil.copytree(old_folder, out)
        training = {n: h for n, h in _snapshot(out).items() if n in TRAINING_FILES}
        r = subprocess.run([sys.executable, "-c", KILL, str(out), str(new_set), kill_at],
                           capture_output=True, text=True, timeout=60)
        completed = kill_at.startswith("never")
        assert r.returncode == (0 if completed else -9), (kill_at, r.stderr)
        assert {n: h for n, h in _snapshot(out).items() if n in TRAINING_FILES} == training
        accepted = assert_one_consistent_set(out)
        if completed:
            assert (out / "manifest.json").read_bytes() == (new_set / "manifest.json").read_bytes()
            assert accepted == {"xray_float32.tflite", "xray.onnx"}
            assert not (out / "xray_int8.tflite").exists()  # the old set's extra file is gone
        else:
            assert (out / "manifest.json").read_bytes() == old_manifest
            # files already replaced or removed are refused; the rest is the old set, whole
            placed = renames[:renames.index(kill_at)]
            assert accepted == {"xray_float32.tflite", "xray_int8.tflite", "xray.onnx"} - {
                s.split()[-1] for s in placed}
            assert list(out.glob(".export-staging-*"))  # the killed run's staging folder
            Staging(out).discard()  # the next export removes the abandoned one
            assert not list(out.glob(".export-staging-*"))
