"""`xray-edge serve` and `status` as real processes: a watched folder, a durable spool, SIGTERM and
SIGKILL with restarts, quarantine, and the status of a spool. DICOM networking: test_serve_dicom.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import SHARED, Service, brightness_model, real_images, results, wait_results
from xray_edge.metrics import score_distribution
from xray_edge.serve.drift import assess, binomial_p, psi, psi_bound
from xray_edge.serve.spool import Spool, film_key


@pytest.fixture
def model(tmp_path) -> Path:
    return brightness_model(tmp_path / "model")


def fill_spool(spool: Path, images: list[Path]) -> list[str]:
    """Accept films into a spool the way the receivers do; returns their keys."""
    sp = Spool(spool)
    keys = []
    for img in images:
        data = img.read_bytes()
        key = film_key(None, data)
        sp.accept(key, data, img.suffix, {"source": "test", "received": time.time(), "path": str(img)})
        keys.append(key)
    return keys


def digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_watch_takes_each_complete_file_once_and_leaves_originals(tmp_path, model):
    watch, spool = tmp_path / "viewer", tmp_path / "spool"
    watch.mkdir()
    images = real_images(4, tmp_path)
    for img in images:
        shutil.copy(img, watch / img.name)
    (watch / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (watch / ".incoming.png").write_bytes(images[0].read_bytes()[:100])  # a temp name: never taken
    before = {p.name: digest(p) for p in watch.iterdir()}

    svc = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        recs = wait_results(spool, 5)
        # a file written in two steps, a pause of two polls between (under the 2 s settle time): taken once, whole
        slow = watch / "slow.png"
        taken = {p.read_bytes() for p in images}  # a film already seen would be skipped by its hash
        data = next(b for b in (p.read_bytes() for p in real_images(8, tmp_path / "more")) if b not in taken)
        with open(slow, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(1.0)
            f.write(data[len(data) // 2:])
        recs = wait_results(spool, 6)
        time.sleep(2)  # several more polls: nothing is taken twice
        assert svc.stop(signal.SIGTERM) == 0
    finally:
        svc.proc.kill()
    recs = results(spool)
    assert len(recs) == 6, recs
    by_path = {Path(r["path"]).name: r for r in recs}
    assert by_path["slow.png"]["key"] == film_key(None, data)  # the complete file, not a half
    assert by_path["broken.jpg"]["status"] == "quarantined"
    reason = (spool / "quarantine" / f"{by_path['broken.jpg']['key']}.reason.txt").read_text()
    assert reason.strip() and "\n" not in reason.strip()
    assert (spool / "quarantine" / f"{by_path['broken.jpg']['key']}.jpg").read_bytes() == (watch / "broken.jpg").read_bytes()
    for img in images:
        r = by_path[img.name]
        assert r["status"] == "classified" and r["label"] in ("COVID19", "NORMAL")
        assert r["threshold"] == 0.5 and r["threshold_source"] == "manifest"
        assert r["model_sha256"] == hashlib.sha256((model / "xray.onnx").read_bytes()).hexdigest()
        assert abs(r["scores"]["COVID19"] + r["scores"]["NORMAL"] - 1) < 1e-5
    assert {p.name: digest(p) for p in watch.iterdir() if p.name != "slow.png"} == before  # untouched
    assert not list((spool / "films").iterdir())
    assert any("stopped" in line for line in svc.lines)

    # a restart over the same folder takes nothing again (keys are content hashes)
    again = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        again.wait_for("watching")
        time.sleep(2)
        assert again.stop() == 0
    finally:
        again.proc.kill()
    assert len(results(spool)) == 6


def test_sigterm_finishes_the_current_film_and_loses_none(tmp_path, model):
    spool, watch = tmp_path / "spool", tmp_path / "empty"
    watch.mkdir()
    keys = fill_spool(spool, real_images(40, tmp_path))
    svc = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        wait_results(spool, 1)
        assert svc.stop(signal.SIGTERM) == 0
    finally:
        svc.proc.kill()
    done = [r["key"] for r in results(spool)]
    waiting = {p.stem for p in (spool / "films").iterdir() if p.suffix != ".json"}
    assert len(done) == len(set(done))
    assert set(done) | waiting == set(keys) and not set(done) & waiting  # each film: result or waiting


def test_sigkill_then_restart_classifies_each_film_exactly_once(tmp_path, model):
    spool, watch = tmp_path / "spool", tmp_path / "empty"
    watch.mkdir()
    keys = fill_spool(spool, real_images(40, tmp_path))
    for round_ in range(3):  # killed at three different points of the queue
        svc = Service("--model", model, "--spool", spool, "--watch", watch)
        try:
            wait_results(spool, 3 * (round_ + 1))
            svc.stop(signal.SIGKILL)
        finally:
            svc.proc.kill()
    svc = Service("--model", model, "--spool", spool, "--exit-when-idle")
    assert svc.proc.wait(120) == 0
    done = [r["key"] for r in results(spool)]
    assert sorted(done) == sorted(keys)  # every film, exactly once
    assert not [p for p in (spool / "films").iterdir()]


def test_a_torn_results_line_is_not_a_result(tmp_path, model):
    """A kill mid-append leaves a partial last line: that film is classified again, once."""
    spool = tmp_path / "spool"
    keys = fill_spool(spool, real_images(2, tmp_path))
    with open(spool / "results.jsonl", "w") as f:
        f.write('{"key":"%s","status":"class' % keys[0])
    svc = Service("--model", model, "--spool", spool, "--exit-when-idle")
    assert svc.proc.wait(120) == 0
    assert sorted(r["key"] for r in results(spool)) == sorted(keys)


def test_serve_refuses_bad_model_and_options_in_one_line(tmp_path, model):
    from conftest import run_cli

    (model / "xray.onnx").write_bytes((model / "xray.onnx").read_bytes() + b"x")
    r = run_cli("serve", "--model", model, "--spool", tmp_path / "s", "--exit-when-idle")
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--model", model, "--spool", tmp_path / "s")
    assert r.returncode == 2 and "--dicom-port" in r.stderr
    r = run_cli("serve", "--model", model, "--spool", tmp_path / "s", "--dicom-port", "104", "--forward", "nope")
    assert r.returncode == 2 and "AE@host:port" in r.stderr


# ----------------------------------------------------------------------------------- drift
def test_psi_and_binomial_bounds_on_known_samples():
    rng = np.random.default_rng(0)
    val = score_distribution(rng.uniform(0, 1, 1000))
    same = rng.uniform(0, 1, 200)
    shifted = rng.beta(5, 2, 200)
    assert psi(same, val) < psi_bound(200, 1000) < psi(shifted, val)
    assert assess(list(same), list(same >= 0.5), val, 0.5).drifting is False
    s = assess(list(shifted), list(shifted >= 0.5), val, 0.5)
    assert s.drifting and "PSI" in s.reason and "share called" in s.reason
    assert binomial_p(100, 200, 0.5) == pytest.approx(1.0)
    assert binomial_p(70, 200, 0.5) < 1e-4 < binomial_p(90, 200, 0.5)


def _films(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def test_status_reports_drift_for_adult_normals(tmp_path):
    """A model validated on one half of the small set (children's normals, adult COVID films):
    the other half stays within bounds, 80 adult normals of another hospital do not."""
    small, adults = SHARED / "chest-xray-small" / "train", SHARED / "nih-adult" / "NORMAL"
    if not (small.is_dir() and adults.is_dir()):
        pytest.skip("../shared/data/chest-xray-small and nih-adult are not here")
    from xray_edge.model import open_model
    from xray_edge.preprocess import load_image

    films = [p for d in ("NORMAL", "COVID19") for p in _films(small / d)]
    val, rest = films[::2], films[1::2]
    probe = open_model(brightness_model(tmp_path / "probe"))
    scores = [float(probe.backend.predict(load_image(p, probe.info.preprocessing))[0]) for p in val]
    model = brightness_model(tmp_path / "model", validation_scores=scores)

    state = {}
    for name, inputs in (("same", rest), ("adults", _films(adults)[:80])):
        watch, spool = tmp_path / f"w-{name}", tmp_path / f"s-{name}"
        watch.mkdir()
        for p in inputs:
            os.symlink(p, watch / p.name)
        svc = Service("--model", model, "--spool", spool, "--watch", watch)
        try:
            wait_results(spool, len(inputs), timeout=180)
            assert svc.stop() == 0
        finally:
            svc.proc.kill()
        warnings = [l for l in svc.lines if l.startswith("warning: drift")]
        from conftest import run_cli

        out = run_cli("status", "--spool", spool, "--json")
        assert out.returncode == 0, out.stderr
        state[name] = (json.loads(out.stdout), warnings, run_cli("status", "--spool", spool).stdout)
    same, adult = state["same"][0], state["adults"][0]
    assert same["classified"] == len(rest) and same["drift"]["drifting"] is False and not state["same"][1]
    assert adult["classified"] == 80 and adult["received"] == 80 and adult["drift"]["drifting"] is True
    assert len(state["adults"][1]) == 1  # one warning line, not one per film
    assert adult["drift"]["psi"] > psi_bound(80, len(val))
    assert "DRIFT" in state["adults"][2] and "classified   80" in state["adults"][2]
    assert abs(sum(adult["rates"].values()) - 1) < 1e-3


def test_hostile_files_are_quarantined_and_the_service_goes_on(tmp_path, model):
    """The hardening tests' hostile DICOMs and truncated/mutated images, among good films."""
    import pydicom

    from test_dicom import ramp, write_dicom

    watch, spool = tmp_path / "viewer", tmp_path / "spool"
    watch.mkdir()
    bad = {"empty.dcm": write_dicom(watch / "empty.dcm", None),
           "dot.dcm": write_dicom(watch / "dot.dcm", np.zeros((1, 1), np.uint16))}
    huge = write_dicom(watch / "huge.dcm", ramp(16, 16))
    ds = pydicom.dcmread(huge)
    ds.Rows, ds.Columns = 12000, 12000
    ds.save_as(huge)
    odd = write_dicom(watch / "odd.dcm", ramp())
    ds = pydicom.dcmread(odd)
    ds.add_new(pydicom.datadict.tag_for_keyword("RescaleSlope"), "LO", "x1")
    ds.save_as(odd)
    good = real_images(3, tmp_path)
    data = good[0].read_bytes()
    (watch / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rng = np.random.default_rng(1)
    flipped = bytearray(data)
    for i in rng.integers(0, len(flipped), 200):
        flipped[i] ^= 0xFF
    (watch / "flipped.jpg").write_bytes(bytes(flipped))
    (watch / "text.jpg").write_bytes(b"not an image at all\n")
    for img in good:
        shutil.copy(img, watch / img.name)
    n = len(list(watch.iterdir()))

    svc = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        recs = wait_results(spool, n)
        assert svc.proc.poll() is None  # still running
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    status = {Path(r["path"]).name: r["status"] for r in recs}
    for img in good:
        assert status[img.name] == "classified"
    for name in ("empty.dcm", "dot.dcm", "huge.dcm", "odd.dcm", "truncated.jpg", "text.jpg"):
        assert status[name] == "quarantined", (name, status)
    assert status["flipped.jpg"] in ("classified", "quarantined")  # JPEG may decode garbage
    reasons = list((spool / "quarantine").glob("*.reason.txt"))
    assert len(reasons) == list(status.values()).count("quarantined")
    assert all(len(p.read_text().strip().splitlines()) == 1 for p in reasons)
    assert not any("Traceback" in line for line in svc.lines)


def test_export_stores_the_validation_score_quantiles(tmp_path):
    """choose_threshold (export) puts P(labels[1]) quantiles of the validation split in the
    operating point, which the manifest carries and the service reads."""
    from xray_edge.export.operating_point import choose_threshold
    from xray_edge.manifest import Manifest
    from xray_edge.training_record import TrainingRecord

    images = real_images(8, tmp_path)
    probs = np.linspace(0.05, 0.95, 8)
    known = {p: np.array([v], np.float32) for p, v in zip(images, probs)}
    record = TrainingRecord(classes=["COVID19", "NORMAL"], positive_class="COVID19",
                            files={"validation": [str(p) for p in images]}, labels={"validation": [0, 1] * 4})
    _, point = choose_threshold(None, record, record.preprocessing, 0.95, known=known)
    dist = point["validation_scores"]
    assert dist["n"] == 8 and len(dist["quantiles"]) == 101
    assert dist["quantiles"][0] == pytest.approx(0.05, abs=1e-5) and dist["quantiles"][-1] == pytest.approx(0.95, abs=1e-5)
    assert dist["quantiles"][50] == pytest.approx(np.median(probs), abs=1e-5)
    assert all(a <= b for a, b in zip(dist["quantiles"], dist["quantiles"][1:]))
    m = Manifest.from_dict({"schema": 1, "labels": ["COVID19", "NORMAL"], "files": {}, "operating_point": point})
    assert m.validation_scores == dist


def test_a_film_the_input_gate_refuses_is_recorded_as_refused(tmp_path, model):
    """The classify path's input gate (xray_edge.gate) declines an MR: one 'refused' line with its
    rule, no report, nothing quarantined."""
    pytest.importorskip("pydicom")
    from serve_helpers import dicom_from_image

    watch, spool = tmp_path / "viewer", tmp_path / "spool"
    watch.mkdir()
    mr = dicom_from_image(real_images(1, tmp_path)[0], tmp_path / "mr.dcm")
    import pydicom

    ds = pydicom.dcmread(mr)
    ds.Modality = "MR"
    ds.save_as(watch / "mr.dcm")
    svc = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        (rec,) = wait_results(spool, 1)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    assert rec["status"] == "refused" and rec["rule"] and "MR" in rec["reason"]
    assert "report" not in rec and not list((spool / "quarantine").iterdir()) and not list((spool / "films").iterdir())


def test_an_sr_that_cannot_be_written_keeps_the_label_and_the_service_goes_on(tmp_path, model):
    """The SR's file name is a folder: the film still gets one 'classified' line (with
    report_error), is not quarantined, and the next film gets its label and its SR."""
    pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid
    from serve_helpers import dicom_from_image

    watch, spool = tmp_path / "viewer", tmp_path / "spool"
    (spool / "outbox").mkdir(parents=True)
    watch.mkdir()
    first, second = (dicom_from_image(img, tmp_path / f"{i}.dcm") for i, img in enumerate(real_images(2, tmp_path)))
    import pydicom

    uid = str(pydicom.dcmread(first).SOPInstanceUID)
    key = film_key(None, first.read_bytes())  # a watched file's key is its sha256
    sha = json.loads((model / "manifest.json").read_text())["files"]["xray.onnx"]["sha256"]
    sr_uid = generate_uid(entropy_srcs=[key, sha, "sr"])  # as report_sr.build_sr derives it
    (spool / "outbox" / f"{sr_uid}.dcm").mkdir()  # the SR cannot be renamed onto a folder
    shutil.copy(first, watch / "first.dcm")
    svc = Service("--model", model, "--spool", spool, "--watch", watch)
    try:
        wait_results(spool, 1)
        shutil.copy(second, watch / "second.dcm")
        recs = wait_results(spool, 2)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    assert len(recs) == 2 and [r["status"] for r in recs] == ["classified", "classified"]
    bad, good = recs
    assert bad["sop_instance_uid"] == uid and bad["label"] in ("COVID19", "NORMAL")
    assert "report" not in bad and "IsADirectoryError" in bad["report_error"]
    assert good["report"] and (spool / "outbox" / good["report"]).is_file() and "report_error" not in good
    assert all(isinstance(r["unlike_training"], list) for r in recs)
    assert not list((spool / "quarantine").iterdir()) and not list((spool / "films").iterdir())


def test_a_destination_that_is_down_is_tried_once_not_per_film(tmp_path, model):
    """After a failed forward the next SRs wait in outbox/ for the 30 s retry: one failure logged
    for three films, all three SRs kept."""
    pytest.importorskip("pynetdicom")
    from serve_helpers import dicom_from_image, free_port

    watch, spool = tmp_path / "viewer", tmp_path / "spool"
    watch.mkdir()
    for i, img in enumerate(real_images(3, tmp_path)):
        dicom_from_image(img, watch / f"{i}.dcm")
    svc = Service("--model", model, "--spool", spool, "--watch", watch,
                  "--forward", f"PACS@127.0.0.1:{free_port()}")  # nothing listens there
    try:
        recs = wait_results(spool, 3)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    assert [r["status"] for r in recs] == ["classified"] * 3 and all(r["report"] for r in recs)
    assert sorted(p.name for p in (spool / "outbox").glob("*.dcm")) == sorted(r["report"] for r in recs)
    assert sum("could not forward" in line for line in svc.lines) == 1, svc.lines


def test_quarantining_a_film_that_is_gone_raises_nothing(tmp_path):
    """A film removed from films/ behind the worker's back: to_quarantine says so with None."""
    sp = Spool(tmp_path / "spool")
    keys = fill_spool(tmp_path / "spool", real_images(1, tmp_path))
    (film,) = Spool(tmp_path / "spool").pending()
    assert film.key == keys[0]
    film.path.unlink()
    assert sp.to_quarantine(film) is None
    assert not list((tmp_path / "spool" / "quarantine").iterdir())


def test_spool_size_counts_a_resent_film_once_when_the_worker_removes_the_old_copy(tmp_path, monkeypatch):
    """The same key sent again while the worker removes the first copy (its result is written):
    the bytes counted against --max-spool end equal to what films/ holds, never one copy less."""
    import xray_edge.serve.spool as spool_mod

    sp = Spool(tmp_path / "spool", max_bytes=1 << 20)
    sp.accept("1.2.3", b"x" * 1000, ".dcm", {})
    (old,) = sp.pending()
    real_write = spool_mod.durable_write

    def write_while_the_worker_removes(path, data):
        if path.suffix == ".dcm" and old.path.exists():
            sp.done(old)  # the worker, between the receiver's look at films/ and its write
        real_write(path, data)

    monkeypatch.setattr(spool_mod, "durable_write", write_while_the_worker_removes)
    sp.accept("1.2.3", b"y" * 3000, ".dcm", {})
    on_disk = sum(p.stat().st_size for p in (tmp_path / "spool" / "films").iterdir() if p.suffix == ".dcm")
    assert on_disk == 3000 and sp._used == 3000
    (film,) = sp.pending()
    sp.done(film)
    sp.done(film)  # a second removal subtracts nothing
    assert sp._used == 0


def test_serve_imports_no_tensorflow_or_keras(tmp_path, model):
    import subprocess

    spool = tmp_path / "spool"
    fill_spool(spool, real_images(1, tmp_path))
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'jax', 'torch')), file=sys.stderr))\n"
            "from xray_edge.cli import main\n"
            f"sys.argv = ['xray-edge', 'serve', '--model', {str(model)!r}, '--spool', {str(spool)!r}, '--exit-when-idle']\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr, r.stderr[-500:]
    assert len(results(spool)) == 1
