"""`xray-edge explain`: occlusion heat maps through the exported runtime files, drawn with Pillow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from xray_edge import explain as ex
from xray_edge.inputs import walk_images
from xray_edge.model import open_model
from xray_edge.preprocess import load_image


def _wide_xray(phantom_data: Path, tmp_path: Path) -> Path:
    """A phantom stretched to 720 x 480: not square, like a real film."""
    src = next(walk_images(phantom_data / "test" / "COVID19"))
    out = tmp_path / "wide.png"
    Image.open(src).resize((720, 480)).save(out)
    return out


@pytest.mark.parametrize("file_name", ["xray_int8.tflite", "xray.onnx"])
def test_png_keeps_aspect_and_captions_label_and_probability(tiny_artifacts, phantom_data, tmp_path, file_name):
    scan = _wide_xray(phantom_data, tmp_path)
    out = tmp_path / "out"
    r = run_cli("explain", "--model", tiny_artifacts, "--file", file_name, scan, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.splitlines()[-1])
    png = Path(d["png"])
    assert png.parent == out and png.name == "wide.explain.png"
    assert np.asarray(d["scores"]).shape == (8, 8) and d["grid_size"] == 8 and d["patch_px"] == 50
    # the label and probability are classify's, for the same file and model
    c = run_cli("classify", "--model", tiny_artifacts, "--file", file_name, "--json", scan)
    cd = json.loads(c.stdout.splitlines()[-1])
    assert d["label"] == cd["label"] and d["probability"] == pytest.approx(cd["probability"], abs=1e-6)
    with Image.open(png) as im:
        im.load()
        text, (w, h) = dict(im.text), im.size
        pixels = np.asarray(im.convert("RGB"))
    assert text["caption"] == f"{cd['label']}  p={cd['probability']:.3f}   frame share {d['frame_share']:.2f}"
    assert json.loads(text["xray_edge_explain"])["scores"] == d["scores"]
    # the picture is 512 x 341 (the original's 3:2), the caption strip below it
    assert w == 512 and h > 341
    picture, strip = pixels[:341], pixels[342:]
    assert picture.std() > 10  # the film with its heat map
    assert strip.max() == 255 and np.median(strip) == 0  # white text on black


def test_occlusion_scores_match_a_manual_occlusion_through_the_runtime(tiny_artifacts, phantom_data):
    loaded = open_model(tiny_artifacts, "xray_int8.tflite")
    img = load_image(next(walk_images(phantom_data / "test" / "NORMAL")))
    res = ex.explain_image(img, loaded.backend.predict, loaded.info.labels, loaded.info.threshold)
    k = loaded.info.labels.index(res.label)

    def p_label(x):
        p = float(loaded.backend.predict(x)[0])
        return p if k == 1 else 1 - p

    assert res.probability == pytest.approx(p_label(img))
    fill = np.round(img.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    for i, j in [(0, 0), (3, 5), (7, 7)]:  # row i, column j: patch centred at ((i+.5)*25, (j+.5)*25)
        x = img.copy()
        y0, x0 = round((i + 0.5) * 25 - 25), round((j + 0.5) * 25 - 25)
        x[max(0, y0):y0 + 50, max(0, x0):x0 + 50] = fill
        assert res.grid[i, j] == pytest.approx(res.probability - p_label(x), abs=1e-6), (i, j)


def test_bad_file_reported_and_others_explained(tiny_artifacts, phantom_data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next(walk_images(phantom_data / "test"))
    r = run_cli("explain", "--model", tiny_artifacts, bad, good, "--out", tmp_path / "out")
    assert r.returncode == 1
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [f"error: {bad}: not a recognised image format"]
    assert (tmp_path / "out" / f"{good.stem}.explain.png").is_file()
    assert not (tmp_path / "out" / "bad.explain.png").exists()


def test_frame_share_definition():
    uniform = np.ones((200, 200))
    assert ex.frame_share(uniform) == pytest.approx(1 - 0.7 ** 2)  # the band's share of the area
    corner = np.zeros((200, 200))
    corner[5:20, 5:20] = 1
    assert ex.frame_share(corner) == 1.0
    centre = np.zeros((200, 200))
    centre[80:120, 80:120] = 1
    centre[0, 0] = -5  # negative attribution (covering it raises the probability) does not count
    assert ex.frame_share(centre) == 0.0
    assert np.isnan(ex.frame_share(-uniform))


def test_overlay_leaves_unattributed_film_untouched():
    film = Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (90, 1)))  # 125 x 90
    a = np.zeros((200, 200))
    a[:, 150:] = 1.0  # the right quarter of the input
    out = np.asarray(ex.overlay(film, a)).astype(int)
    assert out.shape == (90, 125, 3)
    base = np.asarray(film.convert("RGB")).astype(int)
    assert (out[:, :80] == base[:, :80]).all()
    assert np.abs(out[:, 110:] - base[:, 110:]).mean() > 20
