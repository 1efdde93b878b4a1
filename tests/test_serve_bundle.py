"""`make bundle`: the archive installs into a fresh environment with its own script and serves."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from pydicom import dcmread  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification  # noqa: E402

from serve_helpers import brightness_model, dicom_from_image, free_port, real_images, wait_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bundle_installs_into_a_fresh_venv_and_serves(tmp_path):
    model = brightness_model(tmp_path / "artifacts")
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "make_bundle.py"), "--artifacts", str(model),
                        "--out", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    archive = tmp_path / "dist" / "xray-edge-bundle.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    top = "xray-edge-bundle"
    assert {f"{top}/model/manifest.json", f"{top}/model/xray.onnx", f"{top}/xray-edge.service",
            f"{top}/install.sh"} <= names and any(n.endswith(".whl") for n in names)
    unit = (tmp_path / "unpacked" / top / "xray-edge.service").read_text()
    assert "Restart=on-failure" in unit and "User=xray-edge" in unit and "ReadWritePaths=/var/lib/xray-edge" in unit

    prefix = tmp_path / "installed"
    inst = subprocess.run(["sh", str(tmp_path / "unpacked" / top / "install.sh"), "--prefix", str(prefix),
                           "--no-systemd", "--runtime", "onnx"], capture_output=True, text=True, timeout=900)
    if inst.returncode != 0 and ("No matching distribution" in inst.stderr or "Could not find" in inst.stderr):
        pytest.skip(f"no package index reachable: {inst.stderr.strip().splitlines()[-1]}")
    assert inst.returncode == 0, inst.stderr[-2000:]
    exe = prefix / "venv" / "bin" / "xray-edge"
    probe = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c", "import xray_edge, sys; print(xray_edge.__file__)"],
                           capture_output=True, text=True)
    assert str(prefix) in probe.stdout  # the installed copy, not this checkout

    film = dicom_from_image(real_images(1, tmp_path)[0], tmp_path / "film.dcm")
    spool, port = tmp_path / "spool", free_port()
    svc = subprocess.Popen([str(exe), "serve", "--model", str(prefix / "model"), "--spool", str(spool),
                            "--dicom-port", str(port), "--bind", "127.0.0.1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
        import time

        for _ in range(100):  # until it listens
            assoc = ae.associate("127.0.0.1", port)
            if assoc.is_established:
                break
            time.sleep(0.3)
        assert assoc.is_established, svc.stderr.read() if svc.poll() is not None else "not listening"
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(dcmread(film)).Status == 0
        assoc.release()
        rec = wait_results(spool, 1)[0]
        assert rec["status"] == "classified" and rec["model"] == "xray.onnx"
        svc.terminate()
        assert svc.wait(60) == 0
    finally:
        svc.kill()


def test_bundle_refuses_a_manifest_without_a_files_object_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{"schema": 1, "default": "xray.onnx", "files": ["xray.onnx"]}')
    r = subprocess.run([sys.executable, str(ROOT / "packaging" / "make_bundle.py"), "--artifacts", str(tmp_path),
                        "--out", str(tmp_path / "dist")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'files'" in r.stderr
    assert not (tmp_path / "dist").exists()


def test_bundle_leaves_out_a_site_json_for_another_model(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "packaging"))
    try:
        from make_bundle import site_for
    finally:
        sys.path.remove(str(ROOT / "packaging"))
    site = tmp_path / "site.json"
    site.write_text('{"model_sha256": "' + "a" * 64 + '", "threshold": 0.4}')
    assert site_for(site, "xray.onnx", "a" * 64) == site
    assert site_for(site, "xray.onnx", "b" * 64) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "not bundled" in err
    assert site_for(tmp_path / "absent.json", "xray.onnx", "a" * 64) is None
