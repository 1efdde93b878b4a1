"""The report as a person reads it: report.md with one table, and PNG plots beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge import metrics
from xray_edge.files import atomic_write_bytes, atomic_write_json
from xray_edge.train.plotting import pyplot, roc, save_png


def _pct(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['value']:.3f} ({lo:.2f}-{hi:.2f})" if r["n"] else "n/a"


def table(report: dict, key: str = "at_manifest_threshold") -> str:
    head = ("| format | file | size MB | load ms | p50 ms | p99 ms | max abs Δp vs Keras | flips vs Keras "
            "| accuracy | ROC AUC | sensitivity (95% CI) | specificity (95% CI) |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in report["rows"]:
        at = r[key]
        lines.append(
            f"| {r['format']} | {r['file']} | {r['size_mb']:.2f} | {r['load_ms']:.0f} | {r['latency_p50_ms']:.2f} "
            f"| {r['latency_p99_ms']:.2f} | {r['max_abs_diff_vs_keras']:.1e} | {at['flips_vs_keras']} "
            f"| {at['accuracy']['value']:.3f} | {r['roc_auc']:.3f} | {_pct(at['sensitivity'])} | {_pct(at['specificity'])} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    op = report["operating_point"]
    thr = op.get("threshold")
    counts = ", ".join(f"{c}: {n}" for c, n in report["images_per_class"].items())
    warn = ("**SYNTHETIC DATA: the model was trained on generated phantoms, not X-rays. These figures "
            "test the pipeline only.**\n\n" if report["synthetic"] else "")
    small = min(report["images_per_class"].values())
    return f"""# xray-edge report

**Not a medical device.** This is an engineering report on a research model. It was trained on
`{report['trained_on']}` and tested on {sum(report['images_per_class'].values())} images ({counts}) from
{report['test_source']}. With {small} images in the smaller class, every rate below carries a wide
interval: read the 95% Wilson intervals, not the point values.

{warn}- machine: {report['machine']}
- runtimes: {", ".join(f"{k} {v}" for k, v in report['runtimes'].items())}
- model sha256: `{report['model_sha256']}`
- positive (disease) class: {report['positive_class']}
- operating point: P({report['classes'][1]}) >= {thr:.4f} means {report['classes'][1]}; chosen on {op.get('chosen_on')}
  {f"for a target sensitivity of {op['target_sensitivity']}" if 'target_sensitivity' in op else ''}

## At the manifest's operating point (threshold {thr:.4f})

{table(report, "at_manifest_threshold")}

## At 0.5

{table(report, "at_0.5")}

Latency is batch-of-one on this machine, per image of the test set. Flips count test images
whose decision differs from the Keras model's at the same threshold.

## Plots

- ROC of every format: ![roc](report_roc.png)
- Confusion matrices: ![confusion](report_confusion.png)
- Calibration (reliability): ![calibration](report_calibration.png)
- Training curves: [training.png](training.png); sample images: [samples.png](samples.png)
{sets_section(report)}{saliency_section(report)}"""


def set_table(per_format: dict, classes: list[str]) -> str:
    """One row per format and folder of a set: films, share called each class, mean score, figures."""
    head = ("| format | folder | films | " + " | ".join(f"called {c}" for c in classes)
            + " | mean score | AUC vs negative | sensitivity (95% CI) | specificity (95% CI) | ROC AUC |")
    lines = [head, "|" + "|".join(["---"] * (len(classes) + 8)) + "|"]

    def rate(fig: dict, key: str) -> str:
        return _pct(fig[key]) if key in fig else "n/a"

    for fmt, fig in per_format.items():
        auc = f"{fig['roc_auc']:.3f}" if "roc_auc" in fig else "n/a"
        for name, f in fig["folders"].items():
            auc_vs = [f"{v:.3f}" for k, v in f.items() if k.startswith("roc_auc_vs_")]
            called = " | ".join(f"{f['called'][c]:.3f}" for c in classes)
            lines.append(f"| {fmt} | {name} | {f['n']} | {called} | {f['mean_score']:.3f} | "
                         f"{auc_vs[0] if auc_vs else ''} | {rate(fig, 'sensitivity')} | "
                         f"{rate(fig, 'specificity')} | {auc} |")
    return "\n".join(lines)


def sets_section(report: dict) -> str:
    """The test split per data source, and each external set, for every format at the threshold."""
    out = []
    classes = report["classes"]
    thr = report["operating_point"].get("threshold")
    if report.get("sources"):
        out.append(f"\n## Test split per data source (threshold {thr:.4f})\n")
        for name, per_format in report["sources"].items():
            out += [f"### {name}\n", set_table(per_format, classes), ""]
    if report.get("external"):
        out.append(f"\n## External sets (never used in training; threshold {thr:.4f})\n")
        out.append("AUC vs negative: ROC AUC of the positive score, a folder that is no model class "
                   f"against the set's {classes[1 - classes.index(report['positive_class'])]} folder.\n")
        for name, e in report["external"].items():
            out += [f"### {name} (`{e['root']}`)\n", set_table(e["formats"], classes), ""]
    return "\n".join(out) + ("\n" if out else "")


def saliency_section(report: dict) -> str:
    """The saliency page: frame share per format and class, and the side-by-side figure."""
    sal = report.get("saliency")
    if not sal:
        return ""
    classes = report["classes"]
    head = "| method | file | " + " | ".join(f"frame share, {c}" for c in classes) + " | frame share, all |"
    lines = [head, "|" + "|".join(["---"] * (len(classes) + 3)) + "|"]

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    for r in sal["rows"]:
        lines.append(f"| {r['method']} | {r['file']} | " + " | ".join(f(r["by_class"][c]) for c in classes)
                     + f" | {f(r['frame_share'])} |")
    occ = sal["occlusion"]
    return f"""
## Where the models look

**Frame share**: of the positive attribution (the evidence for the label the model gives), the
share that falls in the outer {sal['frame']:.0%} band of each side of the image, where burned-in
text, markers and film borders sit and the lungs do not. The band is {1 - (1 - 2 * sal['frame']) ** 2:.0%}
of the area: evenly spread attribution scores {1 - (1 - 2 * sal['frame']) ** 2:.2f}; a model that reads
the lungs scores well below, one that reads labels or borders well above. Mean over
{len(sal['images'])} test images (up to {sal['per_class']} per class), each explained for the label
the model gives it. Keras: Grad-CAM on the last convolution; exported files: occlusion through
their runtime ({occ['grid']}x{occ['grid']} positions, {occ['patch_px']} px patches of the 200 px input, filled
with the image's mean), as `xray-edge explain` runs on a device.

{chr(10).join(lines)}

![saliency]({sal['figure']})
"""


def plots(report: dict, out: Path) -> None:
    y = np.asarray(report["labels"])
    pos = report["classes"].index(report["positive_class"])
    yp = y == pos

    def score(r):
        return metrics.positive_score(np.asarray(r["probabilities"])[:, None], pos)

    roc(None, None, out / "report_roc.png", title=f"ROC, {report['positive_class']} positive",
        curves={r["format"]: (yp, score(r)) for r in report["rows"]})
    plt = pyplot()
    rows = report["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4))
    for ax, r in zip(np.atleast_1d(axes), rows):
        c = r["at_manifest_threshold"]["confusion"]
        m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=13,
                    color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["pred +", "pred -"])
        ax.set_yticks([0, 1], ["true +", "true -"])
        ax.set_title(r["format"], fontsize=9)
    fig.suptitle(f"Confusion at the manifest threshold ({report['positive_class']} positive)")
    save_png(fig, out / "report_confusion.png")

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    bins = np.linspace(0, 1, 6)
    for r in rows:
        s = score(r)
        idx = np.clip(np.digitize(s, bins) - 1, 0, len(bins) - 2)
        xs = [s[idx == b].mean() for b in range(len(bins) - 1) if (idx == b).any()]
        ys = [yp[idx == b].mean() for b in range(len(bins) - 1) if (idx == b).any()]
        ax.plot(xs, ys, "o-", label=r["format"])
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    ax.set_xlabel(f"predicted P({report['positive_class']})")
    ax.set_ylabel("observed share positive")
    ax.set_title("Calibration (5 bins)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_png(fig, out / "report_calibration.png")


def write(report: dict, out: Path) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    plots(report, out)
