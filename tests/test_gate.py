"""The input gate: only chest radiographs get a label, in classify, calibrate, explain and the library.

Real files: pydicom's own test data (MR, CT, secondary captures, multi-frame), DICOM files written
here with the header of a radiograph, images generated here (phantom films as `make train` draws
them, blank, noise, a page of text, colour) and, where present, the shared real films.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import run_cli
from xray_edge.errors import ImageError
from xray_edge.gate import (DEFAULT_RULES, GateRules, NotChestRadiograph, check_header, check_input,
                            check_statistics, image_statistics, load_checked, reference_ranges,
                            unlike_training)
from xray_edge.train.phantom import phantom_image


def phantom_png(path: Path, seed: int = 0, opacities: bool = False) -> Path:
    Image.fromarray(phantom_image(np.random.default_rng(seed), opacities)).save(path)
    return path


def text_page(path: Path) -> Path:
    page = Image.new("L", (620, 877), 250)
    draw = ImageDraw.Draw(page)
    for i, y in enumerate(range(30, 850, 16)):
        draw.text((30, y), f"line {i}: chest radiograph report, findings and impression", fill=20)
    page.save(path)
    return path


def pydicom_file(name: str) -> Path:
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    f = get_testdata_file(name)
    if f is None:
        pytest.skip(f"pydicom test file {name} is not here")
    return Path(f)


def chest_dicom(path: Path, seed: int = 0, **tags) -> Path:
    """A DX file with a phantom film's pixels (12-bit) and the given header tags."""
    pytest.importorskip("pydicom")
    from test_dicom import write_dicom

    pixels = phantom_image(np.random.default_rng(seed), False).astype(np.uint16) * 16
    p = write_dicom(path, pixels)
    if tags:
        import pydicom

        ds = pydicom.dcmread(p)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(p)
    return p


# --------------------------------------------------------------------------- DICOM rules
@pytest.mark.parametrize("name, rule, words", [
    ("MR_small.dcm", "modality", "Modality MR"),
    ("CT_small.dcm", "modality", "Modality CT"),
    ("SC_rgb_rle.dcm", "modality", "Modality OT"),
    ("examples_ybr_color.dcm", "modality", "Modality US"),
])
def test_pydicom_files_of_other_modalities_are_refused_by_name(name, rule, words):
    decision, image = check_input(pydicom_file(name))
    assert not decision.accepted and image is None
    assert decision.rule == rule
    assert decision.reason == f"not a chest radiograph: {words}"


def test_header_rules_refuse_before_any_pixel_is_read(tmp_path):
    # an MR whose pixel data is cut short: a decision, not a decoding error
    data = pydicom_file("MR_small.dcm").read_bytes()
    cut = tmp_path / "mr_cut.dcm"
    cut.write_bytes(data[: len(data) - 4000])
    with pytest.raises(ImageError):
        from xray_edge.preprocess import load_image

        load_image(cut)
    decision, _ = check_input(cut)
    assert decision.rule == "modality"


@pytest.mark.parametrize("tags, rule", [
    ({"BodyPartExamined": "HAND"}, "body_part"),
    ({"ViewPosition": "LL"}, "view"),
    ({"NumberOfFrames": "2"}, "single_frame"),
    ({"ImageType": ["DERIVED", "SECONDARY"]}, "secondary_capture"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary_capture"),
    ({"ConversionType": "WSD"}, "secondary_capture"),
    ({"Modality": "MR"}, "modality"),
])
def test_radiograph_header_rules(tmp_path, tags, rule):
    decision, _ = check_input(chest_dicom(tmp_path / "x.dcm", **tags))
    assert not decision.accepted and decision.rule == rule, decision


@pytest.mark.parametrize("tags", [{}, {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
                                  {"BodyPartExamined": "chest", "ViewPosition": "AP", "Modality": "CR"}])
def test_chest_radiograph_dicom_is_accepted(tmp_path, tags):
    decision, image = check_input(chest_dicom(tmp_path / "x.dcm", **tags))
    assert decision.accepted, decision.reason
    assert image.shape == (200, 200, 3)


def test_a_malformed_gate_in_the_manifest_is_refused_before_any_image():
    from xray_edge.manifest import Manifest

    base = {"schema": 1, "labels": ["COVID19", "NORMAL"], "threshold": 0.5, "files": {},
            "input": {"preprocessing": {}}}
    assert Manifest.from_dict(base).input_gate == {}
    assert Manifest.from_dict({**base, "input_gate": {"modalities": ["DX"]}}).input_gate == {"modalities": ["DX"]}
    with pytest.raises(ValueError, match="min_contrast"):
        Manifest.from_dict({**base, "input_gate": {"min_contrast": None}})
    # a reference range that is not two numbers would fail on every film: refused with the model
    with pytest.raises(ValueError, match="ranges.contrast"):
        Manifest.from_dict({**base, "input_gate": {"reference": {"ranges": {"contrast": ["a", 1]}}}})
    # a gate from a newer runner may hold rules this one does not know: refused, not dropped
    with pytest.raises(ValueError, match="not one this runner knows"):
        Manifest.from_dict({**base, "input_gate": {"version": "4", "min_contrast": 20}})
    older = Manifest.from_dict({**base, "input_gate": {"version": "2", "min_contrast": 25}}).input_gate
    assert GateRules.from_dict(older).min_contrast == 25 and GateRules.from_dict(older).min_likeness == 0.0


def test_a_file_copied_alone_keeps_its_gate_and_reference(tiny_artifacts, tmp_path):
    # export writes the gate with its reference into every file, not only into the manifest
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_artifacts / "xray_int8.tflite", lone / "model.tflite")
    d = json.loads(run_cli("info", lone / "model.tflite", "--json").stdout)["input_gate"]
    m = json.loads((tiny_artifacts / "manifest.json").read_text())["input_gate"]
    assert d["source"] == "model" and d["reference"] == m["reference"] and m["reference"]["images"] > 0


def test_rules_are_data_with_defaults_and_widen_only_on_purpose():
    assert GateRules.from_dict({}) == DEFAULT_RULES == GateRules.from_dict(None)
    rules = GateRules.from_dict(DEFAULT_RULES.to_dict())
    assert rules == DEFAULT_RULES
    assert GateRules.from_dict({"modalities": ["cr"]}).modalities == ("CR",)
    with pytest.raises(ValueError, match="modalities"):
        GateRules.from_dict({"modalities": "CR"})
    with pytest.raises(ValueError, match="max_colour"):
        GateRules.from_dict({"max_colour": "high"})
    header = {"Modality": "MR"}
    assert check_header(header)[0] == "modality"
    assert check_header(header, DEFAULT_RULES.accepting(modalities=["mr"])) is None
    assert check_header({"Modality": "DX", "BodyPartExamined": "KNEE"},
                        DEFAULT_RULES.accepting(body_parts=["knee"])) is None


# --------------------------------------------------------------------------- image statistics
def test_phantoms_of_make_train_are_accepted(tmp_path):
    for seed in range(6):
        decision, _ = check_input(phantom_png(tmp_path / f"p{seed}.png", seed, bool(seed % 2)))
        assert decision.accepted, decision.reason


def _colour_noise(p):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)).save(p)


def _grey_noise(p):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), np.uint8)).save(p)


def _black(p):
    Image.new("L", (300, 300), 0).save(p)


def _red_square(p):
    a = np.zeros((300, 300, 3), np.uint8)
    a[100:200, 100:200, 0] = 255
    Image.fromarray(a).save(p)


def _gradient(p):
    Image.fromarray(np.tile(np.linspace(0, 255, 300).astype(np.uint8), (300, 1))).save(p)


def _heat_map_over_film(p):
    film = np.repeat(phantom_image(np.random.default_rng(3), False)[..., None], 3, axis=2).astype(float)
    heat = np.zeros_like(film)
    heat[..., 0] = np.linspace(0, 255, film.shape[1])[None, :]
    heat[..., 2] = 255 - heat[..., 0]
    Image.fromarray((0.6 * film + 0.4 * heat).astype(np.uint8)).save(p)


@pytest.mark.parametrize("make, rule", [
    (_black, "contrast"), (_colour_noise, "colour"), (_grey_noise, "roughness"),
    (_red_square, "colour"), (_gradient, "roughness"), (_heat_map_over_film, "colour"),
    (text_page, "roughness"),
])
def test_images_that_are_not_radiographs_are_refused(tmp_path, make, rule):
    p = tmp_path / f"{make.__name__}.png"
    make(p)
    decision, image = check_input(p)
    assert not decision.accepted and image is None
    assert decision.rule == rule, decision.reason
    with pytest.raises(NotChestRadiograph, match="not a chest radiograph"):
        load_checked(p)


def _blurred_noise(p, radius: float, seed: int = 0):
    """White noise blurred by a Gaussian of `radius` pixels (in float), stretched to a film's contrast."""
    f = np.fft.fftfreq(300)
    gauss = np.exp(-2 * np.pi ** 2 * radius ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    a = np.fft.ifft2(np.fft.fft2(np.random.default_rng(seed).normal(size=(300, 300))) * gauss).real
    Image.fromarray(((a - a.mean()) / a.std() * 50 + 128).clip(0, 255).astype(np.uint8)).save(p)


@pytest.mark.parametrize("radius", [5, 8])
def test_the_smoothed_noise_the_first_gate_labelled_is_refused(tmp_path, radius):
    # gate_eval's construction: an 8-bit blur of noise stretched eight times; grey, smooth and
    # symmetric enough to pass every bound of the first version, with no structure at a body's scale
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8))
    p = tmp_path / f"smooth{radius}.png"
    stretched = noise.filter(ImageFilter.GaussianBlur(radius)).point(lambda v: min(255, max(0, (v - 128) * 8 + 128)))
    stretched.save(p)
    decision, _ = check_input(p)
    assert not decision.accepted and decision.rule == "structure", decision.reason
    film = image_statistics(_model_input(phantom_png(tmp_path / "film.png")))
    assert decision.statistics["structure"] < DEFAULT_RULES.min_structure < film["structure"]


@pytest.mark.parametrize("radius, rule", [(6, "structure"), (12, "falloff"), (24, "falloff"),
                                          (32, "falloff")])
def test_noise_blurred_at_any_scale_is_refused(tmp_path, radius, rule):
    # small blurs leave no large-scale structure; large ones leave structure but cut the spectrum
    # off at their scale, where a film's falls like a power law
    p = tmp_path / f"blur{radius}.png"
    _blurred_noise(p, radius)
    decision, _ = check_input(p)
    assert not decision.accepted and decision.rule == rule, decision.reason


@pytest.mark.parametrize("seed", range(3))
def test_clouds_of_1_over_f_noise_are_refused_for_their_gaussian_edges(tmp_path, seed):
    # structure at every scale like a film's, but no sharp edge: the neighbour differences of a
    # random field are Gaussian (kurtosis 3), a film's heavy-tailed
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(300)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    k[0, 0] = 1
    spectrum = (rng.normal(size=(300, 300)) + 1j * rng.normal(size=(300, 300))) / k ** 1.5
    spectrum[0, 0] = 0
    a = np.fft.ifft2(spectrum).real
    p = tmp_path / "clouds.png"
    Image.fromarray(((a - a.mean()) / a.std() * 55 + 128).clip(0, 255).astype(np.uint8)).save(p)
    decision, _ = check_input(p)
    assert not decision.accepted and decision.rule == "edges", decision.reason
    film = image_statistics(_model_input(phantom_png(tmp_path / "film.png")))
    assert decision.statistics["edges"] < DEFAULT_RULES.min_edges < film["edges"]


def test_a_stretched_8_bit_blur_is_refused_for_its_few_grey_levels(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    b = np.asarray(noise.filter(ImageFilter.GaussianBlur(20)), np.float64)  # a few levels around 128
    p = tmp_path / "terraces.png"
    Image.fromarray(((b - b.mean()) / b.std() * 55 + 128).clip(0, 255).astype(np.uint8)).save(p)
    decision, _ = check_input(p)
    assert not decision.accepted and decision.rule == "posterized", decision.reason
    film = image_statistics(_model_input(phantom_png(tmp_path / "film.png")))
    assert film["posterized"] < DEFAULT_RULES.max_posterized < decision.statistics["posterized"]


@pytest.mark.parametrize("name, rule", [
    ("CT_small.dcm", "lungs"),  # an axial slice through a vertebra: its dark lungs are at the top
    ("J2K_pixelrep_mismatch.dcm", "black"),  # an axial slice of a head on black air
    ("MR_small.dcm", "mediastinum"),
])
def test_ct_and_mr_slices_saved_as_png_are_refused(tmp_path, name, rule):
    from xray_edge.dicom import read_dicom

    try:
        pixels = read_dicom(pydicom_file(name))
    except ImageError as exc:  # a compressed syntax without its decoder here
        pytest.skip(str(exc))
    p = tmp_path / f"{name}.png"
    Image.fromarray(pixels).save(p)
    decision, _ = check_input(p)
    assert not decision.accepted and decision.rule == rule, decision.reason


def _model_input(path: Path, size: int = 200) -> np.ndarray:
    from xray_edge.preprocess import Preprocessing, load_image

    return load_image(path, Preprocessing(size=size))


@pytest.mark.parametrize("size", [48, 200])
def test_phantoms_pass_the_layout_and_spectrum_bounds_at_small_input_sizes(tmp_path, size):
    # the spectrum counts only whole octaves below the Nyquist limit of the model's input
    from xray_edge.gate import decide_image

    for seed in range(4):
        image = _model_input(phantom_png(tmp_path / f"p{seed}.png", seed, bool(seed % 2)), size)
        decision = decide_image(image)
        assert decision.accepted, (size, decision.reason)


def test_the_gate_judges_the_film_before_the_intensity_step(tmp_path):
    """Equalisation would stretch a black page into contrast: the gate decides on the plain pixels
    and hands the model the equalised ones."""
    from xray_edge.preprocess import Preprocessing, load_image

    eq = Preprocessing(intensity="equalize")
    black, film = tmp_path / "black.png", phantom_png(tmp_path / "film.png", 0, True)
    Image.fromarray(np.full((300, 300), 3, np.uint8)).save(black)  # near black: equalize spreads it
    assert check_input(black)[0].rule == check_input(black, eq)[0].rule == "contrast"
    decision, image = check_input(film, eq)
    assert decision.accepted and np.array_equal(image, load_image(film, eq))
    assert not np.array_equal(image, load_image(film))


def test_a_grey_photograph_that_passes_every_statistic_is_refused_by_its_likeness(tmp_path):
    # matplotlib's Grace Hopper upside down: not among the pictures likeness was fitted to
    import matplotlib

    p = tmp_path / "hopper.png"
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        im.convert("L").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(p)
    decision, image = check_input(p)
    assert not decision.accepted and image is None
    assert decision.rule == "likeness" and "not like a chest film" in decision.reason
    assert check_statistics({**decision.statistics, "likeness": 0.0}) is None  # every other bound passes
    film = check_input(phantom_png(tmp_path / "film.png", 2))[0]
    assert film.accepted and film.statistics["likeness"] > 0


@pytest.mark.shared
def test_the_shipped_likeness_is_the_fit_of_the_shared_films(shared_data, tmp_path):
    """edge/likeness.json is what tests/tools/fit_likeness.py fits: no number in it by hand."""
    import subprocess
    import sys

    from xray_edge.likeness import WEIGHTS

    tools = Path(__file__).parent / "tools"
    out = tmp_path / "likeness.json"
    run = subprocess.run([sys.executable, str(tools / "fit_likeness.py"), "--data", str(shared_data.parent),
                          "--write", str(out)], cwd=tools, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    new, shipped = json.loads(out.read_text()), json.loads(WEIGHTS.read_text())
    assert new["films"] == shipped["films"] and new["non_radiographs"] == shipped["non_radiographs"]
    np.testing.assert_allclose(new["weights"] + [new["bias"]], shipped["weights"] + [shipped["bias"]],
                               rtol=1e-4, atol=1e-5)


def test_real_films_are_accepted(shared_data):
    films = sorted(p for p in Path(shared_data).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    refused = [p.name for p in films if not check_input(p)[0].accepted]
    assert films and len(refused) <= 0.01 * len(films), refused


def test_unlike_training_flags_films_outside_the_reference(tmp_path):
    films = [phantom_image(np.random.default_rng(s), False) for s in range(20)]
    ref = reference_ranges([np.repeat(f[..., None], 3, axis=2) for f in films])
    rules = GateRules(reference=ref)
    same = np.repeat(phantom_image(np.random.default_rng(99), False)[..., None], 3, axis=2)
    assert len(unlike_training(image_statistics(same), rules)) <= 1  # 1st-99th percentiles of 20 films
    low = (same.astype(np.float32) * 0.45 + 60).astype(np.uint8)  # washed-out film, another scanner
    flags = unlike_training(image_statistics(low), rules)
    assert "contrast" in flags
    assert unlike_training(image_statistics(low), DEFAULT_RULES) == ()  # no reference: no flag


# --------------------------------------------------------------------------- the commands
@pytest.fixture
def mixed(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = phantom_png(d / "film.png")
    mr = d / "mr.dcm"
    mr.write_bytes(pydicom_file("MR_small.dcm").read_bytes())
    page = text_page(d / "page.png")
    return good, mr, page


def test_classify_refuses_with_the_rule_and_goes_on(tiny_artifacts, mixed):
    good, mr, page = mixed
    r = run_cli("classify", "-m", tiny_artifacts, mr, good, page)
    assert r.returncode == 1
    assert f"refused: {mr}: not a chest radiograph: Modality MR" in r.stderr
    assert f"refused: {page}: not a chest radiograph: noise or fine texture" in r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}\t")
    r = run_cli("classify", "--json", "-m", tiny_artifacts, mr, good)
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert recs[0] == {"path": str(mr), "status": "refused", "rule": "modality",
                       "refused": "not a chest radiograph: Modality MR"}
    assert "label" in recs[1] and "error" not in recs[1] and "contrast" not in recs[1]["unlike_training"]


def test_a_film_unlike_the_training_films_is_labelled_and_flagged(tiny_artifacts, tmp_path):
    film = phantom_image(np.random.default_rng(5), False).astype(np.float32)
    washed = tmp_path / "washed.png"  # another scanner: the same anatomy at under half the contrast
    Image.fromarray((film * 0.45 + 70).astype(np.uint8)).save(washed)
    r = run_cli("classify", "--json", "-m", tiny_artifacts, washed)
    rec = json.loads(r.stdout)
    assert r.returncode == 0 and "label" in rec
    assert "contrast" in rec["unlike_training"]


def test_accept_modality_widens_the_gate_with_a_warning(tiny_artifacts, mixed):
    _, mr, _ = mixed
    r = run_cli("classify", "--accept-modality", "MR", "-m", tiny_artifacts, mr)
    assert "warning: input gate widened on request: also accepting Modality MR" in r.stderr
    assert "Modality MR" not in r.stderr.split("\n", 2)[-1]  # past the header rule ...
    assert "not a chest radiograph" in r.stderr  # ... the head slice still fails the image statistics


def test_explain_refuses(tiny_artifacts, mixed, tmp_path):
    good, mr, _ = mixed
    out = tmp_path / "ex"
    r = run_cli("explain", "-m", tiny_artifacts, "--out", out, "--grid", "2", mr, good)
    assert r.returncode == 1
    assert f"refused: {mr}: not a chest radiograph: Modality MR" in r.stderr
    assert len(list(out.glob("*.png"))) == 1


def test_calibrate_skips_refused_files(tiny_artifacts, tmp_path):
    # The site's labels are the tiny model's own ranking (upper half COVID19), so it separates
    # them and calibrate gets as far as choosing (a site it cannot separate is refused whole);
    # what this tests is the refused file among them, skipped with its line.
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(24):
        phantom_png(pool / f"{i}.png", seed=i, opacities=i % 2 == 0)
    r = run_cli("classify", "-m", tiny_artifacts, "--json", pool)
    scores = {Path(d["path"]).name: d["scores"]["COVID19"] for d in map(json.loads, r.stdout.splitlines())}
    ranked = sorted(scores, key=scores.get)
    site = tmp_path / "site"
    for names, cls in ((ranked[12:], "COVID19"), (ranked[:12], "NORMAL")):
        (site / cls).mkdir(parents=True)
        for name in names:
            shutil.copy(pool / name, site / cls / name)
    (site / "NORMAL" / "mr.dcm").write_bytes(pydicom_file("MR_small.dcm").read_bytes())
    art = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))  # site.json goes there
    r = run_cli("calibrate", "-m", art, "--data", site, "--json")
    assert f"refused: {site / 'NORMAL' / 'mr.dcm'}: not a chest radiograph: Modality MR (skipped)" in r.stderr
    assert json.loads(r.stdout)["counts"] == {"COVID19": 12, "NORMAL": 12}


def test_info_shows_the_rules(tiny_artifacts):
    r = run_cli("info", tiny_artifacts, "--json")
    gate = json.loads(r.stdout)["input_gate"]
    assert gate["modalities"] == list(DEFAULT_RULES.modalities)
    # export recorded the statistics of the phantom films the model was made from
    assert gate["source"] == "model" and gate["reference"]["images"] > 0
    lo, hi = gate["reference"]["ranges"]["contrast"]
    assert 20 < lo < hi < 80


@pytest.mark.parametrize("size", [256, 1024])
def test_the_benchmarks_film_is_accepted(tmp_path, size):
    # make bench and bench-serve time real classifications of this drawing: a refusal is no figure
    from xray_edge.bench import synthetic_jpeg

    decision, _ = check_input(synthetic_jpeg(tmp_path / "one.jpg", size))
    assert decision.accepted, decision.reason
