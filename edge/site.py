"""`site.json`: an operating point measured at the site where the model runs.

A model's ranking tends to survive the move to another hospital; its threshold does not (other
scanners, other patients: the scores shift). `xray-edge calibrate` classifies the site's own
labelled images with the deployed model file, chooses the threshold with the rule export uses on
the validation split (`metrics.output_threshold_for_sensitivity`) and records it here, bound to
that file's sha256. The model files and manifest.json are never changed; `classify` takes the
threshold from site.json only when it was made for the very file it loaded.

The one place that knows the file name and schema of site.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xray_edge.classify import predicted_classes
from xray_edge.errors import ModelError, XrayEdgeError, first_line
from xray_edge.files import atomic_write_json, check_schema, read_json_record
from xray_edge.gate import DEFAULT_RULES, GateRules, loader
from xray_edge.manifest import check_sha256, check_threshold
from xray_edge.preprocess import Preprocessing, load_images

SITE_NAME = "site.json"
SCHEMA_VERSION = 1
MIN_PER_CLASS = 10  # below this a sensitivity is a guess (one case moves it by 10 points or more)
DEFAULT_MAX_CI_WIDTH = 0.25  # a 95% interval wider than this gets a warning
# At or below this the model hardly ranks this site's cases: any threshold is a guess there, so
# no site.json is written (classify would otherwise use it silently).
MIN_ROC_AUC = 0.6
SPLIT_HALF_ROUNDS = 200


@dataclass(frozen=True)
class SiteCalibration:
    """The threshold chosen on one site's images for one model file, and how well it did there."""

    model_file: str
    model_sha256: str
    threshold: float  # on P(labels[1]), like the manifest's
    previous_threshold: float | None  # what classify used before (manifest or file)
    rule: dict  # name, target_sensitivity, positive_class
    counts: dict  # class -> images used
    figures: dict  # "previous" / "site": decision_report at each threshold; roc_auc; split_half
    data: str = ""  # the SITE folder
    backend: str = ""
    skipped: list = field(default_factory=list)  # files that could not be decoded
    ignored: list = field(default_factory=list)  # subfolders of SITE that name no class
    created: str = ""
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {"schema": self.schema, "created": self.created, "model_file": self.model_file,
                "model_sha256": self.model_sha256, "threshold": self.threshold,
                "previous_threshold": self.previous_threshold, "rule": self.rule,
                "counts": self.counts, "figures": self.figures, "data": self.data,
                "backend": self.backend, "skipped": self.skipped, "ignored": self.ignored}

    @classmethod
    def from_dict(cls, d) -> "SiteCalibration":
        check_schema(d, SCHEMA_VERSION)
        sha = check_sha256(d.get("model_sha256"), "'model_sha256'")
        thr = check_threshold(d.get("threshold"))
        if thr is None:
            raise ValueError("'threshold' is missing")
        for key in ("rule", "counts", "figures"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{key!r} is not an object")
        known = set(cls.__dataclass_fields__) - {"threshold", "model_sha256"}
        return cls(model_sha256=sha, threshold=float(thr), **{k: d[k] for k in known if k in d})

    def write(self, folder: Path) -> Path:
        """Write site.json atomically; XrayEdgeError (one line) when the folder refuses it."""
        try:
            return atomic_write_json(folder / SITE_NAME, self.to_dict())
        except OSError as exc:
            raise XrayEdgeError(f"{folder / SITE_NAME}: cannot write "
                                f"({exc.strerror or first_line(exc)})") from None

    @classmethod
    def read(cls, folder: Path) -> "SiteCalibration | None":
        """The record in `folder`; None when there is none; ModelError when it is unusable."""
        return read_json_record(folder / SITE_NAME, cls.from_dict, ModelError)


def resolve_threshold(model_path: Path, sha256: str, base: float | None, base_source: str,
                      override: float | None) -> tuple[float | None, str]:
    """The threshold classify uses, and where it came from.

    --threshold wins; then a site.json beside the model made for this file (same sha256); else
    `base` (the manifest's or the file's own, named by `base_source`).

    Raises:
        ModelError: site.json is malformed or was made for another model file.
    """
    if override is not None:
        return override, "--threshold"
    rec = SiteCalibration.read(Path(model_path).parent)
    if rec is None:
        return base, base_source
    if rec.model_sha256 != sha256:
        raise ModelError(
            f"{Path(model_path).parent / SITE_NAME} was made for {rec.model_file} "
            f"(sha256 {rec.model_sha256[:12]}...), not {Path(model_path).name} ({sha256[:12]}...): "
            "run xray-edge calibrate for this file, or pass --threshold")
    return rec.threshold, SITE_NAME


@dataclass
class SiteImages:
    paths: list[Path]
    labels: np.ndarray  # class index per path
    ignored: list[str]  # subfolders that name no class of the model


def find_site_images(root: Path, classes: tuple[str, ...]) -> SiteImages:
    """SITE/<class>/* for each of the model's classes (recursive, as classify walks folders)."""
    if not root.is_dir():
        raise XrayEdgeError(f"{root}: not a folder (expected {root}/<class>/* for {', '.join(classes)})")
    from xray_edge.folders import walk_classes

    found = walk_classes(root, list(classes))
    return SiteImages(found.paths, found.labels, found.ignored)


def split_half(y_pos: np.ndarray, probs: np.ndarray, pos: int, target: float,
               rounds: int = SPLIT_HALF_ROUNDS, seed: int = 0) -> dict:
    """Choose on a random stratified half, measure on the other half; mean over `rounds`.

    The figures at the site threshold are measured on the images it was chosen on, so they
    flatter it; this is what to expect on the site's next cases.
    """
    from xray_edge import metrics  # calibration only: not imported by classify

    rng = np.random.default_rng(seed)
    y = np.asarray(y_pos, bool)
    sens, spec, acc = [], [], []
    for _ in range(rounds):
        pick = np.zeros(len(y), bool)
        for cls in (True, False):
            idx = np.flatnonzero(y == cls)
            pick[rng.choice(idx, len(idx) // 2, replace=False)] = True
        thr = metrics.output_threshold_for_sensitivity(y[pick], probs[pick], pos, target)
        rest = ~pick
        rep = metrics.decision_report(y[rest], calls_positive(probs[rest], pos, thr))
        sens.append(rep["sensitivity"]["value"])
        spec.append(rep["specificity"]["value"])
        acc.append(rep["accuracy"]["value"])
    return {"rounds": rounds, "sensitivity": float(np.mean(sens)), "specificity": float(np.mean(spec)),
            "accuracy": float(np.mean(acc))}


def calls_positive(probs: np.ndarray, pos: int, threshold: float) -> np.ndarray:
    """The runner's decision (labels[1] when P(labels[1]) >= threshold) as "called positive"."""
    return predicted_classes(probs, threshold) == pos


def choose(y: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], pos: int,
           previous: float | None, target: float) -> tuple[float, dict]:
    """The site threshold for `target` sensitivity and the figures at the previous and new one.

    Args:
        y: class index per image; probs: [N, 1] sigmoid outputs of the deployed file.
    Returns:
        (threshold on P(labels[1]), figures dict for site.json).
    """
    from xray_edge import metrics  # calibration only: not imported by classify

    y_pos = np.asarray(y) == pos
    thr = metrics.output_threshold_for_sensitivity(y_pos, probs, pos, target)
    figures = {"roc_auc": metrics.roc_auc(y_pos, metrics.positive_score(probs, pos))}
    if previous is not None:
        figures["previous"] = {"threshold": previous,
                               **metrics.decision_report(y_pos, calls_positive(probs, pos, previous))}
    figures["site"] = {"threshold": thr, **metrics.decision_report(y_pos, calls_positive(probs, pos, thr))}
    figures["split_half"] = split_half(y_pos, probs, pos, target)
    return thr, figures


def calibrate(predict, classes: tuple[str, ...], pos: int, spec: Preprocessing, site: Path,
              previous: float | None, target: float, rules: GateRules = DEFAULT_RULES,
              ignored: list | None = None) -> tuple[float, dict, dict, list[str]]:
    """Classify SITE/<class>/* with `predict` (one uint8 image -> output) and choose the threshold.

    Only what the input gate `rules` accepts is used; a refused file is skipped like a broken one.

    Returns:
        (threshold, figures, counts per class, one message per file that was skipped).
        `ignored` (when given) receives the subfolders that name no class of the model.
    Raises:
        XrayEdgeError: not a two-class model, under MIN_PER_CLASS usable images of a class, or a
            ROC AUC at or below MIN_ROC_AUC on the site's images.
    """
    if len(classes) != 2:
        raise XrayEdgeError("calibrate covers two-class (sigmoid) models")
    found = find_site_images(site, classes)
    if ignored is not None:
        ignored += found.ignored
    images, ok, errors = load_images(found.paths, spec, load=loader(rules))
    y = found.labels[ok]
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    short = [f"{c}: {n}" for c, n in counts.items() if n < MIN_PER_CLASS]
    if short:
        extra = f" (ignored folders: {', '.join(found.ignored)})" if found.ignored else ""
        raise XrayEdgeError(f"{site}: too few usable images ({', '.join(short)}); calibrate needs at "
                            f"least {MIN_PER_CLASS} per class in {site}/<class>/{extra}")
    probs = np.stack([np.asarray(predict(img), np.float32).reshape(-1) for img in images])
    thr, figures = choose(y, probs, classes, pos, previous, target)
    auc = figures["roc_auc"]
    if not auc > MIN_ROC_AUC:
        raise XrayEdgeError(
            f"{site}: the model hardly separates this site's classes (ROC AUC {auc:.2f}, at most "
            f"{MIN_ROC_AUC}); no threshold can fix that, so no {SITE_NAME} was written: check the "
            f"class folders ({', '.join(classes)}), or retrain with this site's images")
    return thr, figures, counts, errors


def calibrate_model(loaded, site: Path, target: float,
                    rules: GateRules = DEFAULT_RULES) -> tuple[SiteCalibration, list[str]]:
    """`calibrate` with a model from `xray_edge.model.open_model`; the record for its folder."""
    from xray_edge import metrics  # calibration only: not imported by classify

    info = loaded.info
    manifest = loaded.resolved.manifest
    named = manifest.positive_class if manifest else None
    pos = metrics.positive_index(info.labels, named, strict=False)
    ignored: list[str] = []
    thr, figures, counts, errors = calibrate(loaded.backend.predict, info.labels, pos,
                                             info.preprocessing, site, info.threshold, target, rules,
                                             ignored)
    rec = SiteCalibration(
        model_file=loaded.path.name, model_sha256=loaded.sha256, threshold=thr,
        previous_threshold=info.threshold,
        rule={"name": "threshold_for_sensitivity", "target_sensitivity": target,
              "positive_class": info.labels[pos],
              "decision": f"{info.labels[1]} when P({info.labels[1]}) >= threshold"},
        counts=counts, figures=figures, data=str(Path(site).resolve()), backend=loaded.backend.name,
        skipped=errors, ignored=ignored, created=now_utc())
    return rec, errors


def wide_intervals(figures: dict, max_width: float) -> list[str]:
    """'sensitivity 0.61-0.97' for each figure at the site threshold wider than `max_width`."""
    out = []
    for key in ("sensitivity", "specificity"):
        lo, hi = figures["site"][key]["ci95"]
        if hi - lo > max_width:
            out.append(f"{key} {lo:.2f}-{hi:.2f}")
    return out


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def summary(rec: SiteCalibration) -> str:
    """What calibrate prints: the figures at the previous and the new threshold."""
    pos = rec.rule.get("positive_class", "")
    f = rec.figures

    def rate(r: dict) -> str:
        lo, hi = r["ci95"]
        return f"{r['value']:.3f} ({lo:.2f}-{hi:.2f}, {r['k']}/{r['n']})"

    lines = ["site images: " + ", ".join(f"{c} {n}" for c, n in rec.counts.items())
             + f"; ROC AUC {f['roc_auc']:.3f} ({pos} positive)"]
    for key, name in (("previous", "previous threshold"), ("site", "site threshold*")):
        if key in f:
            lines.append(f"{name:<19} {f[key]['threshold']:.4f}  sensitivity {rate(f[key]['sensitivity'])}  "
                         f"specificity {rate(f[key]['specificity'])}")
    sh = f["split_half"]
    lines.append("* measured on the images it was chosen on, so it flatters the threshold; the line "
                 "below does not")
    lines.append(f"chosen on half, measured on the other half ({sh['rounds']} random halves): "
                 f"sensitivity {sh['sensitivity']:.3f}, specificity {sh['specificity']:.3f}, "
                 f"accuracy {sh['accuracy']:.3f}")
    return "\n".join(lines)
