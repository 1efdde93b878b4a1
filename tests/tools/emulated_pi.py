"""Run `xray-edge classify` on a Raspberry Pi's software stack, emulated, and compare with this host.

    python tests/tools/emulated_pi.py [--artifacts DIR] [--cpu cortex-a72 --cpu cortex-a76] [--cache .cache/pi]

What it does (and how to check a Pi image before flashing it):
1. Assembles an arm64 Debian 12 (bookworm) userland with its Python 3.11, the OS of 64-bit
   Raspberry Pi OS, from Debian's archive through a private apt configuration (the host's own
   apt sources, arm64 only; the host's dpkg is never touched). Cached under --cache.
2. Installs the project's wheel with the aarch64 wheels of its runtimes: one site folder with
   LiteRT + onnxruntime (numpy 2), one with tflite-runtime 2.14 (numpy<2, as its extra pins).
3. Under qemu-user with a pinned CPU model (qemu's default `max` gave wrong int8 results),
   runs each model with each runtime, both through the real CLI and as raw output tensors,
   and compares with the same code on this host: raw int8 outputs must be identical, float
   outputs within 1e-5, labels equal. Also asserts the emulated machine is aarch64 and that
   TensorFlow is not there.
4. The device bundle (`make bundle`'s archive, built here from the same model unless --bundle
   names one): its install.sh makes a fresh venv on the emulated Pi and installs the wheel with
   [serve,litert] from aarch64 wheels downloaded here (offline, as on a Pi without internet),
   with --no-systemd (no systemd under qemu-user); the installed `xray-edge serve` gets C-ECHO
   and C-STORE of one DICOM film built from a real image, sent by pynetdicom on this host; a
   classified result line (same label and probability as this host's classify) and a DICOM SR
   must appear, and SIGTERM must end it with 0. The kernel starts the arm64 programs (venv,
   pip, the installed script) through qemu by a binfmt_misc of a private user namespace
   (Linux >= 6.7); the host's own binfmt registrations are not touched.

Emulated timings say nothing about a real Pi's speed and are not reported.
Needs qemu-user-static (Debian package) and apt; `make pi-test` installs qemu when missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOAT_ATOL = 1e-5
# python3.11-venv: ensurepip and its wheels, for the bundle's install.sh (it makes a venv)
SYSROOT_PACKAGES = ["python3.11", "python3.11-venv", "libstdc++6", "libgcc-s1", "libgomp1"]
SYSROOT_VERSION = "2"  # bump when SYSROOT_PACKAGES change
# pip on x86 does not treat manylinux_2_28 as covering older tags: list each one, or it silently
# picks old releases (ai-edge-litert 1.4.0) and misses tflite-runtime 2.14 (manylinux_2_34).
PLATFORMS = [f"manylinux_2_{v}_aarch64" for v in range(17, 37)] + ["manylinux2014_aarch64"]
# onnxruntime reads /proc/cpuinfo; qemu passes the host's x86 one through, and onnxruntime then
# crashes at import. `-L` serves the sysroot's copy first, so give it a Pi 4's.
PI_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
              "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
              "CPU revision\t: 3\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")

# (model file, runtime, site folder)
MATRIX = [
    ("xray_int8.tflite", "litert", "site-litert"),
    ("xray_float32.tflite", "litert", "site-litert"),
    ("xray.onnx", "onnxruntime", "site-litert"),
    ("xray_int8.tflite", "tflite", "site-tflite"),
    ("xray_float32.tflite", "tflite", "site-tflite"),
]

PROBE = r"""
import importlib.util, json, platform, sys
from pathlib import Path
from xray_edge.backends import open_backend
from xray_edge.preprocess import load_image
model, backend, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
be = open_backend(Path(model), backend)
raw = [be.raw_output(load_image(p)) for p in paths]
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "tensorflow_installed": importlib.util.find_spec("tensorflow") is not None,
                  "dtype": str(raw[0].dtype), "raw": [r.tolist() for r in raw]}))
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd[:6]))} ...\n{p.stderr[-2000:]}")
    return p


def build_sysroot(cache: Path) -> Path:
    """arm64 Debian bookworm with python3.11, unpacked from .debs (no root, no host dpkg)."""
    root = cache / "root"
    stamp = cache / f"sysroot-v{SYSROOT_VERSION}.ok"
    if stamp.exists():
        return root
    shutil.rmtree(cache / "apt", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    apt = cache / "apt"
    for d in ("lists/partial", "archives/partial", "cache", "sources", "preferences"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    # the host's configured Debian sources, restricted to arm64
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if not src.exists():
        raise SystemExit(f"{src} not found: this script expects a Debian 12 host")
    lines = []
    for line in src.read_text().splitlines():
        lines.append(line)
        if line.startswith("Types:"):
            lines.append("Architectures: arm64")
    (apt / "sources" / "debian.sources").write_text("\n".join(lines) + "\n")
    opts = ["-o=Dir::Etc::SourceList=/dev/null", f"-o=Dir::Etc::SourceParts={apt}/sources",
            f"-o=Dir::Etc::PreferencesParts={apt}/preferences", f"-o=Dir::State::Lists={apt}/lists",
            f"-o=Dir::State::Status={apt}/status", f"-o=Dir::Cache={apt}/cache",
            f"-o=Dir::Cache::archives={apt}/archives", "-o=APT::Architecture=arm64",
            "-o=APT::Architectures::=arm64", "-o=Debug::NoLocking=1"]
    run(["apt-get", *opts, "-qq", "update"])
    run(["apt-get", *opts, "-qq", "-y", "--no-install-recommends", "--download-only", "install", *SYSROOT_PACKAGES])
    debs = sorted((apt / "archives").glob("*.deb"))
    root.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)])
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(PI_CPUINFO)
    print(f"sysroot: {len(debs)} arm64 packages unpacked into {root}")
    stamp.write_text("ok\n")
    return root


def install_sites(cache: Path) -> None:
    wheels = cache / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)])
    wheel = next(wheels.glob("xray_edge-*.whl"))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    common = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *plat,
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
              "--upgrade"]
    for site, reqs in (("site-litert", ["ai-edge-litert", "onnxruntime"]),
                       ("site-tflite", ["tflite-runtime==2.14.0", "numpy<2"])):
        target = cache / site
        if not (target / f".{'-'.join(reqs)}.ok").exists():
            shutil.rmtree(target, ignore_errors=True)
            run([*common, "--target", str(target), *reqs, "pillow", "click"])
            (target / f".{'-'.join(reqs)}.ok").write_text("ok\n")
        run([*common, "--no-deps", "--target", str(target), str(wheel)])  # always the current code
        shutil.rmtree(target / "bin", ignore_errors=True)


def make_artifacts(out: Path) -> tuple[Path, list[Path]]:
    """A small real model trained on nothing, exported with the project's own exporter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from xray_edge.export.pipeline import ExportConfig, run_export
    from xray_edge.inputs import walk_images
    from xray_edge.train.phantom import generate_phantoms
    from xray_edge.train.testing import save_with_record, tiny_model

    data = generate_phantoms(out / "phantom", n_train=8, n_test=4)
    art = out / "artifacts"
    path = save_with_record(tiny_model(), art, ["COVID19", "NORMAL"], data)
    res = run_export(ExportConfig(model=path, out=art, formats=("float32", "int8", "onnx")), log=lambda s: None)
    if not res.passed:
        raise SystemExit("export of the test model failed its parity gates")
    return art, sorted(walk_images(data / "test"))


# binfmt_misc entry for aarch64 ELF files (Debian's qemu-user-static one); flag F opens qemu now,
# so it is found whatever the program's root. The kernel reads the \x escapes itself.
BINFMT_AARCH64 = (r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
                  r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:{qemu}:F")
BUNDLE_CPU = "cortex-a72"  # a Pi 4
BUNDLE_RUNTIME = "litert"  # install.sh's default
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def arm64_namespace(qemu: str) -> list[str]:
    """Command prefix: run in a new user and mount namespace whose own binfmt_misc hands aarch64
    programs to qemu, so their children (a venv's python, pip, console scripts) are arm64 too."""
    script = ("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
              'printf %s "$1" > /proc/sys/fs/binfmt_misc/register && shift && exec "$@"')
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
            BINFMT_AARCH64.format(qemu=qemu)]


def bundle_wheelhouse(cache: Path, wheel: Path, extras: str) -> Path:
    """aarch64 wheels of `wheel[extras]`'s dependencies, downloaded on this host once per set of
    requirements: pip on the emulated Pi then installs with --no-index from this folder."""
    import hashlib

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = sorted(l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:"))
    key = hashlib.sha256("\n".join([extras, *requires, *PLATFORMS]).encode()).hexdigest()[:12]
    target = cache / f"wheelhouse-{key}"
    if not (target / ".ok").exists():
        shutil.rmtree(target, ignore_errors=True)
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", *plat,
             "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
             "-d", str(target), f"{wheel}[{extras}]"])
        for w in target.glob("xray_edge-*.whl"):  # the bundle's own wheel is the one installed
            w.unlink()
        (target / ".ok").write_text("ok\n")
    return target


def check_bundle(cache: Path, root: Path, qemu: str, art: Path, bundle: Path | None, work: Path) -> list[str]:
    """Install the device bundle on the emulated Pi with its install.sh, serve, send one film.

    Returns the problems found (empty: passed); prints what it did.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
    from serve_helpers import dicom_from_image, free_port, real_images

    from xray_edge.serve.spool import read_results

    if bundle is None:
        run([sys.executable, str(ROOT / "packaging" / "make_bundle.py"), "--artifacts", str(art),
             "--out", str(work / "dist")])
        bundle = work / "dist" / "xray-edge-bundle.tar.gz"
    with tarfile.open(bundle) as tar:
        tar.extractall(work / "bundle", filter="data")
    here = work / "bundle" / "xray-edge-bundle"
    wheelhouse = bundle_wheelhouse(cache, next(here.glob("xray_edge-*.whl")), f"serve,{BUNDLE_RUNTIME}")
    (work / "home").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work / "home"), "PYTHONNOUSERSITE": "1",
           "QEMU_LD_PREFIX": str(root), "QEMU_CPU": BUNDLE_CPU, "PYTHON": str(root / "usr/bin/python3.11"),
           # this host's pip configuration is not the Pi's: no config files, no index, our wheels
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse),
           "PIP_NO_CACHE_DIR": "1"}
    ns = arm64_namespace(qemu)
    probe = subprocess.run([*ns, env["PYTHON"], "-c", "import platform; print(platform.machine())"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "aarch64":
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"cannot start arm64 programs through a private binfmt_misc (needs Linux >= 6.7 and "
                f"unshare; --no-bundle skips this check): {why}"]

    prefix = work / "pi-install"
    inst = subprocess.run([*ns, "sh", str(here / "install.sh"), "--prefix", str(prefix), "--no-systemd",
                           "--runtime", BUNDLE_RUNTIME], env=env, capture_output=True, text=True, timeout=1800)
    if inst.returncode != 0:
        return [f"install.sh failed ({inst.returncode}): {inst.stderr.strip()[-1500:]}"]
    venv_py = prefix / "venv" / "bin" / "python"
    facts = json.loads(run([*ns, str(venv_py), "-c", "import json, platform, importlib.util, xray_edge; print(json.dumps("
                            "{'machine': platform.machine(), 'package': xray_edge.__file__, "
                            "'tensorflow': importlib.util.find_spec('tensorflow') is not None}))"], env=env).stdout)
    print(f"bundle: {bundle.name}: install.sh --prefix DIR --no-systemd --runtime {BUNDLE_RUNTIME} on "
          f"{facts['machine']} ({BUNDLE_CPU}): fresh venv, wheels from a local folder, model checked by xray-edge info")
    problems = []
    if facts["machine"] != "aarch64" or not facts["package"].startswith(str(prefix)) or facts["tensorflow"]:
        problems.append(f"installed environment is not the bundle's alone on aarch64: {facts}")

    image = real_images(1, work)[0]
    film = dicom_from_image(image, work / "film.dcm")
    host = json.loads(run([sys.executable, "-m", "xray_edge.cli", "classify", "--json", "-m", str(art),
                           str(film)]).stdout.splitlines()[0])
    spool, port = work / "pi-spool", free_port()
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        svc = subprocess.Popen([*ns, str(prefix / "venv" / "bin" / "xray-edge"), "serve", "--model",
                                str(prefix / "model"), "--spool", str(spool), "--dicom-port", str(port),
                                "--bind", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # "connection refused" until it listens
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
        end = time.monotonic() + 300  # start-up under emulation: imports of numpy, pydicom, LiteRT
        while True:
            assoc = ae.associate("127.0.0.1", port)
            if assoc.is_established or svc.poll() is not None or time.monotonic() > end:
                break
            time.sleep(1)
        if not assoc.is_established:
            return problems + [f"serve did not accept an association: {log_path.read_text()[-1500:]}"]
        echo, store = assoc.send_c_echo(), assoc.send_c_store(dcmread(film))
        assoc.release()
        print(f"bundle: xray-edge serve --dicom-port (installed, arm64): C-ECHO 0x{echo.Status:04X}, "
              f"C-STORE 0x{store.Status:04X} of {film.name} (DX from real image {image.name})")
        if echo.Status != 0 or store.Status != 0:
            return problems + ["C-ECHO or C-STORE not answered Success"]
        end = time.monotonic() + 300
        while not (recs := list(read_results(spool / "results.jsonl"))) and time.monotonic() < end:
            time.sleep(1)
        if not recs:
            return problems + [f"no result line within 300 s: {log_path.read_text()[-1500:]}"]
        rec, srs = recs[0], sorted((spool / "outbox").glob("*.dcm"))
        sr = dcmread(srs[0]) if srs else None
        print(f"bundle: results.jsonl: {rec.get('status')} {rec.get('label')} p={rec.get('probability')} "
              f"(this host's classify: {host.get('label')} p={host.get('probability')}); "
              f"SR: {f'outbox/{srs[0].name}, Modality {sr.Modality}' if sr else 'none'}")
        if rec.get("status") != "classified" or rec.get("label") != host.get("label") or \
                abs(rec.get("probability", -1) - host.get("probability", -2)) > 1e-5:
            problems.append(f"result differs from this host's: {rec} vs {host}")
        ds = dcmread(film)
        if sr is None or sr.SOPClassUID != BASIC_TEXT_SR or sr.StudyInstanceUID != ds.StudyInstanceUID:
            problems.append("no Basic Text SR of the film's study in outbox/")
        svc.terminate()
        rc = svc.wait(120)
        print(f"bundle: SIGTERM: serve exited {rc}")
        if rc != 0:
            problems.append(f"serve exited {rc} on SIGTERM: {log_path.read_text()[-800:]}")
    finally:
        if svc.poll() is None:
            svc.kill()
            svc.wait()
    return problems


def compare(host: dict, pi: dict) -> list[str]:
    """Problems between host and emulated results (empty list: identical within tolerance)."""
    problems = []
    if pi["machine"] != "aarch64":
        problems.append(f"emulated machine is {pi['machine']}, not aarch64")
    if pi["tensorflow_installed"]:
        problems.append("TensorFlow is installed in the emulated environment")
    if len(host["raw"]) != len(pi["raw"]):
        return problems + ["different number of outputs"]
    for i, (a, b) in enumerate(zip(host["raw"], pi["raw"])):
        if host["dtype"] in ("uint8", "int8"):
            if a != b:
                problems.append(f"image {i}: raw int8 output {b} != host {a}")
        else:
            d = max(abs(x - y) for x, y in zip(a, b))
            if d > FLOAT_ATOL:
                problems.append(f"image {i}: float output differs by {d:.2e} > {FLOAT_ATOL}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="exported models to check (default: a small model exported for the test)")
    ap.add_argument("--images", type=Path, nargs="*", default=None)
    ap.add_argument("--cpu", action="append", default=None, help="qemu CPU model (repeatable)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "pi")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="device bundle to install (default: make_bundle.py of the model checked)")
    ap.add_argument("--no-bundle", action="store_true", help="skip the bundle install and serve check")
    args = ap.parse_args()
    cpus = args.cpu or ["cortex-a72", "cortex-a76"]
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        raise SystemExit("qemu-aarch64-static not found: apt-get install qemu-user-static")
    cache = args.cache.resolve()
    root = build_sysroot(cache)
    install_sites(cache)
    work = Path(tempfile.mkdtemp(prefix="xray-pi-"))
    if args.artifacts:
        art, images = args.artifacts.resolve(), [p.resolve() for p in (args.images or [])]
        if not images:
            raise SystemExit("--artifacts needs --images")
    else:
        art, images = make_artifacts(work)
    images = images[:6]
    probe = work / "probe.py"
    probe.write_text(PROBE)

    failures = 0
    print(f"{'cpu':<11} {'model':<20} {'runtime':<12} {'raw outputs':<28} {'CLI labels':<10}")
    for cpu in cpus:
        for model, runtime, site in MATRIX:
            env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            pi_py = [qemu, "-cpu", cpu, "-L", str(root), "-E", f"PYTHONPATH={cache / site}",
                     str(root / "usr/bin/python3.11")]
            host_site_env = dict(os.environ)
            host_py = [sys.executable]
            if runtime == "tflite":
                tflite_py = os.environ.get("XRAY_EDGE_TFLITE_PYTHON")
                if not tflite_py:
                    print(f"{cpu:<11} {model:<20} {runtime:<12} skipped: no host tflite-runtime (XRAY_EDGE_TFLITE_PYTHON)")
                    continue
                host_py = [tflite_py]
            args_probe = [str(probe), str(art / model), runtime, *map(str, images)]
            host = json.loads(run([*host_py, *args_probe], env=host_site_env).stdout)
            pi = json.loads(run([*pi_py, *args_probe], env=env).stdout)
            problems = compare(host, pi)
            cli = ["-m", "xray_edge.cli", "classify", "--json", "-m", str(art), "--file", model,
                   "--backend", runtime, *map(str, images)]
            h = [json.loads(l) for l in run([*host_py, *cli], env=host_site_env).stdout.splitlines()]
            p = [json.loads(l) for l in run([*pi_py, *cli], env=env).stdout.splitlines()]
            if [x["label"] for x in h] != [x["label"] for x in p]:
                problems.append("CLI labels differ")
            ok_raw = "identical" if host["dtype"] in ("uint8", "int8") else f"within {FLOAT_ATOL:g}"
            status = "FAIL: " + "; ".join(problems) if problems else f"{host['dtype']} {ok_raw}"
            print(f"{cpu:<11} {model:<20} {runtime:<12} {status:<28} {'equal' if not problems else '-'}")
            failures += bool(problems)
    print(f"\nemulated: {pi['machine']}, Python {pi['python']}, TensorFlow installed: {pi['tensorflow_installed']}")
    if not args.no_bundle:
        problems = check_bundle(cache, root, qemu, art, args.bundle and args.bundle.resolve(), work)
        for p in problems:
            print(f"bundle: FAIL: {p}")
        print(f"bundle: {'FAILED' if problems else 'passed'}")
        failures += bool(problems)
    print(f"{'FAILED' if failures else 'passed'}: {failures} mismatching combinations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
