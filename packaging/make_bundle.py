"""Write the device bundle: wheel, model files, manifest (+ site.json), systemd unit, install script.

    python packaging/make_bundle.py --artifacts artifacts --out dist

The model file bundled is the manifest's default (what `serve` runs), checked against its sha256
first; the archive is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=Path, default=Path("dist"))
    ap.add_argument("--file", default=None, help="model file to bundle (default: the manifest's default)")
    args = ap.parse_args()
    manifest_path = args.artifacts / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {manifest_path}: {exc} (run make train export first)", file=sys.stderr)
        return 1
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        print(f"error: {manifest_path}: 'files' is not an object of exported files (run make export again)",
              file=sys.stderr)
        return 1
    name = args.file or manifest.get("default") or "xray_int8.tflite"
    entry = files.get(name)
    model = args.artifacts / name
    if entry is None or not model.is_file():
        print(f"error: {model}: not exported or not in the manifest", file=sys.stderr)
        return 1
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    if not isinstance(entry, dict) or sha != entry.get("sha256"):
        print(f"error: {model}: sha256 differs from the manifest's; export again", file=sys.stderr)
        return 1
    site = site_for(args.artifacts / "site.json", model.name, sha)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = Path(tmp) / "wheel"
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                            "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("xray_edge-*.whl"))
        if r.returncode != 0 or not wheels:
            print(f"error: building the wheel failed: {r.stderr.strip().splitlines()[-1:] }", file=sys.stderr)
            return 1
        bundled = dict(manifest, default=name)  # the device has this one file
        args.out.mkdir(parents=True, exist_ok=True)
        final = args.out / "xray-edge-bundle.tar.gz"
        part = args.out / ".xray-edge-bundle.tar.gz.part"
        top = "xray-edge-bundle"
        with tarfile.open(part, "w:gz") as tar:
            tar.add(wheels[0], f"{top}/{wheels[0].name}")
            tar.add(model, f"{top}/model/{name}")
            data = (json.dumps(bundled, indent=2) + "\n").encode()
            info = tarfile.TarInfo(f"{top}/model/manifest.json")
            info.size, info.mode = len(data), 0o644
            import io

            tar.addfile(info, io.BytesIO(data))
            if site is not None:
                tar.add(site, f"{top}/model/site.json")
            tar.add(ROOT / "packaging" / "xray-edge.service", f"{top}/xray-edge.service")
            tar.add(ROOT / "packaging" / "install.sh", f"{top}/install.sh")
        os.replace(part, final)
    print(f"{final}: {wheels[0].name}, model/{name}, manifest.json"
          f"{', site.json' if site is not None else ''}, xray-edge.service, install.sh "
          f"({final.stat().st_size / 1e6:.1f} MB)")
    print(f"on the device: tar xzf {final.name} && sudo {top}/install.sh")
    return 0


def site_for(path: Path, model_name: str, sha: str) -> Path | None:
    """site.json when it is for the bundled model file; else None, with a warning line (a site
    threshold chosen for another model would be refused on the device)."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        theirs = d.get("model_sha256") if isinstance(d, dict) else None
    except (OSError, ValueError) as exc:
        print(f"warning: {path}: unreadable ({exc}); not bundled", file=sys.stderr)
        return None
    if theirs != sha:
        print(f"warning: {path}: for sha256 {str(theirs)[:12]}..., not {model_name} ({sha[:12]}...); not bundled",
              file=sys.stderr)
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
