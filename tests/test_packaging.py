"""The wheel a device installs: the three parts under one namespaced name, and no tests."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_three_parts_and_no_tests(tmp_path):
    # built from the files a clone has (tracked or not ignored): a build/ or *.egg-info left here
    # by an earlier build would add files a fresh clone's wheel lacks
    import shutil

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for f in files:
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(clone)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("xray_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"xray_edge"}, tops
    for part in ("xray_edge/cli.py", "xray_edge/preprocess.py", "xray_edge/train/trainer.py",
                 "xray_edge/export/pipeline.py", "xray_edge/export/report/build.py",
                 "xray_edge/likeness.json"):  # the input gate's fitted score: data, not code
        assert part in names, part
    assert not [n for n in names if "test_" in n or "conftest" in n or n.startswith("tests/")]
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["xray_edge"]
