"""Several data sources in one training, external sets, and the one operating point.

Two phantom "sources": A (both classes, a planted marker on every film) and B (normals only, three
films per patient in labels.csv), as a COVID set and an adult hospital's normals would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xray_edge import metrics
from xray_edge.errors import DatasetError
from xray_edge.train.dataset import balance_weights, discover, stratified_split
from xray_edge.train.phantom import generate_source

CLASSES = ["COVID19", "NORMAL"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sources")
    a = generate_source(root / "hospital_a", {"COVID19": 20, "NORMAL": 20}, seed=1, marker=True)
    b = generate_source(root / "hospital_b", {"NORMAL": 30, "PNEUMONIA": 6}, seed=2, films_per_patient=3)
    return a, b


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> Path:
    """A one-class external set plus a folder that is no model class."""
    return generate_source(tmp_path_factory.mktemp("ext") / "hospital_c",
                           {"NORMAL": 8, "PNEUMONIA": 8}, seed=3)


def _splits(sources, seed=5):
    from xray_edge.train.trainer import TrainConfig, _make_splits

    ds = discover(list(sources), CLASSES)
    return ds, _make_splits(ds, TrainConfig(data=tuple(sources), seed=seed))


def test_bare_layout_classes_pick_and_one_class_source(sources, tmp_path):
    ds = discover(list(sources), CLASSES)
    assert ds.classes == CLASSES and [s.layout for s in ds.sources] == ["<class>/", "<class>/"]
    b = ds.sources[1]
    assert b.patients and b.pool.counts(CLASSES) == {"COVID19": 0, "NORMAL": 30}  # PNEUMONIA left out
    with pytest.raises(DatasetError, match="at least two class folders"):
        discover([generate_source(tmp_path / "only", {"NORMAL": 2}, seed=0)])
    with pytest.raises(DatasetError, match="none of the classes"):
        discover([sources[1]], ["COVID19", "OTHER"])


def test_validation_and_test_stratified_by_source_and_class(sources):
    ds, splits = _splits(sources)
    for name in ("validation", "test"):
        s = splits[name]
        for src, cls, total in ((0, 0, 20), (0, 1, 20), (1, 1, 30)):
            n = int(((s.sources == src) & (s.labels == cls)).sum())
            # 20% of each (source, class) stratum, in whole patients of 3 films for source B
            assert abs(n - 0.2 * total * (0.8 if name == "validation" else 1)) <= 3, (name, src, cls, n)
    everything = [p for s in splits.values() for p in s.paths]
    assert len(everything) == len(set(everything)) == 70


def test_a_patients_films_never_sit_on_both_sides(sources):
    ds, splits = _splits(sources)
    groups = {k: set(v.groups[v.sources == 1]) for k, v in splits.items()}
    assert groups["train"] and groups["validation"] and groups["test"]
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    # the grouping is real: films of one patient are together, 3 at a time
    val_b = splits["validation"].groups[splits["validation"].sources == 1]
    assert all(np.sum(val_b == g) == 3 for g in set(val_b))
    # without the grouping, the same split cuts patients apart: the test above can fail
    pool = ds.sources[1].pool
    keep, held = stratified_split(pool.labels, 0.2, 5)
    assert set(pool.groups[keep]) & set(pool.groups[held])


def test_balance_weights():
    labels = np.array([0] * 10 + [1] * 30)
    sources = np.array([0] * 10 + [0] * 10 + [1] * 20)
    w = balance_weights(labels, sources, "class")
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    w = balance_weights(labels, sources, "source-class")
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    assert w[(labels == 1) & (sources == 0)].sum() == pytest.approx(w[(labels == 1) & (sources == 1)].sum())
    assert np.all(balance_weights(labels, sources, "none") == 1)
    with pytest.raises(DatasetError, match="balance"):
        balance_weights(labels, sources, "oversample")


def test_set_figures_share_called_wilson_and_auc_vs_negative():
    # folders: COVID19 (model class), NORMAL (model class), PNEUMONIA (no model class)
    folder_of = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    p_normal = np.array([0.1, 0.6, 0.9, 0.8, 0.3, 0.7, 0.2, 0.75])  # P(labels[1]) = P(NORMAL)
    f = metrics.set_figures(folder_of, ["COVID19", "NORMAL", "PNEUMONIA"], p_normal[:, None], CLASSES, 0, 0.5)
    assert f["folders"]["NORMAL"]["called"] == {"COVID19": 0.25, "NORMAL": 0.75}
    assert f["folders"]["PNEUMONIA"]["called"]["COVID19"] == 0.5
    assert f["sensitivity"]["k"] == 1 and f["sensitivity"]["n"] == 2
    assert f["specificity"]["ci95"] == list(metrics.wilson_interval(3, 4))
    # COVID19 score = 1 - P(NORMAL): pneumonia 0.8, 0.25 vs normals 0.1, 0.2, 0.7, 0.3
    assert f["folders"]["PNEUMONIA"]["roc_auc_vs_NORMAL"] == pytest.approx(6 / 8)
    one = metrics.set_figures(np.zeros(3, int), ["NORMAL"], np.array([[0.9], [0.2], [0.8]]), CLASSES, 0, 0.5)
    assert "sensitivity" not in one and "roc_auc" not in one and one["specificity"]["k"] == 2


def test_operating_point_says_how_many_positives_and_warns():
    rng = np.random.default_rng(0)
    y = np.array([True] * 12 + [False] * 40)
    probs = np.where(y, rng.uniform(0, 0.5, 52), rng.uniform(0.3, 1, 52))[:, None]  # P(NORMAL)
    p = metrics.operating_point(y, probs, 0, 0.95, "validation")
    assert p["positives"] == 12 and "warning" in p and "at least 20" in p["warning"]
    assert p["validation_sensitivity"]["value"] >= 0.95
    assert "warning" not in metrics.operating_point(np.r_[y, [True] * 10], np.r_[probs, probs[:10]], 0, 0.95, "v")


def test_one_rule_for_the_disease_class():
    from xray_edge.training_record import TrainingRecord

    assert metrics.positive_index(["COVID19", "NORMAL"]) == 0
    assert metrics.positive_index(["NORMAL", "PNEUMONIA"]) == 1
    assert metrics.positive_index(["A", "B"]) == 0 and metrics.positive_index(["A", "B"], "B") == 1
    with pytest.raises(ValueError):
        metrics.positive_index(["A", "B"], "C")
    assert TrainingRecord(classes=["NORMAL", "PNEUMONIA"]).positive_index == 1


# ------------------------------------------------------------------ real training runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, sources, external):
    """The same seeded run twice without --external (the backend's noise), once with it."""
    from xray_edge.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, ext in (("plain1", ()), ("plain2", ()), ("external", (("hospital_c", external),))):
        cfg = TrainConfig(data=tuple(sources), classes=tuple(CLASSES), external=ext, out=root / name,
                          epochs=3, verbose=0, plots=False, cache_dir=root / "cache", seed=7)
        out[name] = train(cfg, log=lambda s: None)
    return out


def _weights(result) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(result.model_path, compile=False).get_weights()


def test_external_sets_choose_nothing(runs):
    a, b, e = runs["plain1"], runs["plain2"], runs["external"]
    noise = max(float(np.abs(x - y).max()) for x, y in zip(_weights(a), _weights(b)))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(_weights(a), _weights(e)))
    assert diff <= max(2 * noise, 1e-6), (diff, noise)
    assert a.record.best_epoch == e.record.best_epoch
    t_noise = abs(a.record.operating_point["threshold"] - b.record.operating_point["threshold"])
    assert abs(a.record.operating_point["threshold"] - e.record.operating_point["threshold"]) <= max(2 * t_noise, 1e-6)
    assert "hospital_c" in e.metrics["external"] and not a.metrics["external"]


def test_sources_recorded_and_measured_at_the_operating_point(runs):
    res = runs["external"]
    rec = json.loads((res.model_path.parent / "training.json").read_text())
    assert [s["name"] for s in rec["sources"]] == ["hospital_a", "hospital_b"]
    b = rec["sources"][1]
    assert b["grouped_by_patient"] and sum(b["counts"][k]["NORMAL"] for k in b["counts"]) == 30
    assert all(b["counts"][k]["COVID19"] == 0 for k in b["counts"])
    assert sum(rec["balance"]["sample_weights"]["hospital_a"]["COVID19"].values()) > 0
    op = rec["operating_point"]
    assert op["positives"] == rec["counts"]["validation"]["COVID19"] and "warning" in op  # 4 positives
    m = json.loads((res.model_path.parent / "metrics.json").read_text())
    assert m["threshold"] == op["threshold"]  # the test line is at the operating point, not 0.5
    assert set(m["sources"]) == {"hospital_a", "hospital_b"}
    assert m["sources"]["hospital_a"]["n"] + m["sources"]["hospital_b"]["n"] == m["n"]
    assert m["sources"]["hospital_b"]["counts"]["COVID19"] == 0
    ext = m["external"]["hospital_c"]
    assert ext["folders"]["NORMAL"]["n"] == 8 and ext["folders"]["PNEUMONIA"]["n"] == 8
    assert sum(ext["folders"]["NORMAL"]["called"].values()) == pytest.approx(1.0)
    assert "roc_auc_vs_NORMAL" in ext["folders"]["PNEUMONIA"] and "sensitivity" not in ext


def test_cli_train_with_two_sources_refuses_a_bad_external(sources, tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--data", sources[0], "--data", sources[1], "--classes", "COVID19,NORMAL",
                "--external", f"x={tmp_path / 'missing'}", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--external x" in r.stderr
    r = run_cli("train", "--data", sources[0], "--external", "no-equals-sign")
    assert r.returncode == 2 and "NAME=DIR" in r.stderr
