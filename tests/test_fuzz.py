"""Mutated image files through the decode path: only the tool's own error type may come out."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xray_edge.errors import ImageError
from xray_edge.preprocess import load_image


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (48, 64), dtype=np.uint8)
    out = {}
    for fmt, suffix, mode in (("JPEG", ".jpg", "L"), ("PNG", ".png", "RGBA"), ("PNG", ".png", "P"),
                              ("BMP", ".bmp", "RGB"), ("TIFF", ".tif", "L"), ("GIF", ".gif", "P")):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        out[f"seed{len(out)}{suffix}"] = buf.getvalue()
    return out


SEEDS = _seed_files()
NAMES = sorted(SEEDS)


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(NAMES))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "zero":
            data[pos:pos + draw(st.integers(1, 64))] = b"\0" * min(64, len(data) - pos)
    return name, bytes(data)


@settings(max_examples=3000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_files_give_an_array_or_image_error(tmp_path, case):
    name, data = case
    p = tmp_path / name
    p.write_bytes(data)
    try:
        x = load_image(p)
    except ImageError as err:
        assert str(p) in str(err) and "\n" not in str(err)
        return
    assert x.shape == (200, 200, 3) and x.dtype == np.uint8
