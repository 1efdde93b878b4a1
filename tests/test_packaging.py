"""The wheel a device installs: the three parts under one namespaced name, and no tests."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_three_parts_and_no_tests(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("xray_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"xray_edge"}, tops
    for part in ("xray_edge/cli.py", "xray_edge/preprocess.py", "xray_edge/train/trainer.py",
                 "xray_edge/export/pipeline.py", "xray_edge/export/report/build.py"):
        assert part in names, part
    assert not [n for n in names if "test_" in n or "conftest" in n or n.startswith("tests/")]
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["xray_edge"]
