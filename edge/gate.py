"""The input gate: only chest radiographs get a label.

Two checks, in this order, both on the device without TensorFlow:

1. DICOM rules, from the header before any pixel is decoded: Modality (CR, DX, RG), body part
   (CHEST where given), view (PA/AP where given), one frame, an original image (not a secondary
   capture or a derived screenshot).
2. Image statistics on the model's own input array (any file, DICOM too): colour, contrast,
   texture, shares of white, black and flat grey, left-right symmetry, the chest's column
   profile, large-scale structure, the fall of the spectrum, air-filled lungs above a dense
   centre, sharp edges and a smooth grey-level histogram. They refuse blank and uniform images,
   colour pictures and screenshots, pages of text, noise (smoothed or not) and CT or MR slices
   saved as pictures; the bounds were chosen with ``make gate-eval`` (docs/edge.md, with what
   they miss). Last, `likeness` weighs the image's layout and these statistics together, a
   score fitted to real films and phantoms against built non-radiographs (`xray_edge.likeness`):
   it refuses most of the grey photographs, icons and diagrams that pass every single bound.
   A film that passes but lies outside the statistics of the films the model came from is
   labelled and flagged (`Decision.unlike_training`).

The rules are data (`GateRules`), stored in the manifest as ``input_gate`` (defaults for manifests
without one), shown by ``xray-edge info`` and widened only on purpose (``--accept-modality``).
`check_input` is the one entry point: classify, calibrate, explain and a service call it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from xray_edge import likeness
from xray_edge.errors import ImageError, ModelError

GATE_VERSION = "3"  # 3: the likeness score
_KNOWN_VERSIONS = ("1", "2", "3")  # an older gate gets this runner's defaults for what it lacks
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC Image Storage and its multi-frame kin

# Bounds on the image statistics, in the order they are checked: the bound's name in GateRules
# -> what an image outside it is.
_REASONS = {
    "max_colour": "a colour image (X-rays are grey)",
    "min_contrast": "blank or nearly uniform",
    "max_roughness": "noise or fine texture such as text",
    "min_roughness": "too smooth for a film (a drawn gradient?)",
    "max_white": "mostly white (a document or a page?)",
    "max_flat": "mostly one flat grey (a page or a drawing?)",
    "max_black": "mostly black",
    "min_symmetry": "not left-right symmetric like a frontal chest film",
    "min_mediastinum": "no chest column profile (a film's mediastinum is brighter than its lungs)",
    "min_structure": "no large-scale structure (noise or texture, not a body)",
    "min_falloff": "a spectrum cut off at one scale (blurred noise?), not a film's",
    "min_lungs": "no air-filled lungs above a dense centre (a cross-section or a picture?)",
    "min_edges": "no sharp edges, a random field's texture (clouds or noise?)",
    "max_posterized": "a few grey levels, not a film's smooth range (posterized or drawn?)",
    "min_likeness": "not like a chest film taken as a whole (a photograph, icon or drawing?)",
}


@dataclass(frozen=True)
class GateRules:
    """What the gate accepts. Stored in the manifest; `from_dict` fills in defaults."""

    modalities: tuple[str, ...] = ("CR", "DX", "RG")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")  # BodyPartExamined, where given
    views: tuple[str, ...] = ("PA", "AP")  # ViewPosition, where given
    single_frame: bool = True
    original_only: bool = True  # refuse secondary captures and ImageType SECONDARY
    # bounds on the image statistics of `image_statistics` (see _REASONS)
    max_colour: float = 0.02
    min_contrast: float = 20.0
    max_roughness: float = 0.25
    min_roughness: float = 0.018
    max_white: float = 0.5
    max_flat: float = 0.6
    max_black: float = 0.55
    min_symmetry: float = -0.5
    min_mediastinum: float = -0.5
    min_structure: float = 0.4
    min_falloff: float = -6.0
    min_lungs: float = 0.25
    min_edges: float = 4.0
    max_posterized: float = 0.4
    min_likeness: float = 0.0  # xray_edge.likeness: 0 is its fitted bound
    # the range of each statistic over the films the model came from (`reference_ranges`): a film
    # outside is labelled and flagged, not refused
    reference: dict = field(default_factory=dict)
    version: str = GATE_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("modalities", "body_parts", "views"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d) -> "GateRules":
        """Rules from a manifest (None or {} -> defaults); ValueError names a malformed value."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ValueError("'input_gate' is not an object")
        version = d.get("version", GATE_VERSION)
        if version not in _KNOWN_VERSIONS:  # a newer gate's rules would be dropped without a word
            raise ValueError(f"'input_gate.version' {version!r} is not one this runner knows "
                             f"({', '.join(_KNOWN_VERSIONS)}): written by a newer xray-edge?")
        kw = {}
        for k in ("modalities", "body_parts", "views"):
            if k in d:
                v = d[k]
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"'input_gate.{k}' is not a list of names")
                kw[k] = tuple(x.upper() for x in v)
        for k in ("single_frame", "original_only"):
            if k in d:
                if not isinstance(d[k], bool):
                    raise ValueError(f"'input_gate.{k}' is not true or false")
                kw[k] = d[k]
        for k in _REASONS:
            if k in d:
                v = d[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                    raise ValueError(f"'input_gate.{k}' is not a number")
                kw[k] = float(v)
        if "reference" in d:
            kw["reference"] = _reference(d["reference"])
        return cls(**kw)

    def accepting(self, modalities=(), body_parts=(), views=()) -> "GateRules":
        """These rules widened on purpose (the --accept-* options)."""
        def more(old, new):
            return tuple(dict.fromkeys([*old, *(x.upper() for x in new)]))

        return replace(self, modalities=more(self.modalities, modalities),
                       body_parts=more(self.body_parts, body_parts), views=more(self.views, views))


def _reference(ref) -> dict:
    """A stored reference, checked: {"images": n, "ranges": {statistic: [low, high]}}."""
    if not isinstance(ref, dict):
        raise ValueError("'input_gate.reference' is not an object")
    ranges = ref.get("ranges", {})
    if not isinstance(ranges, dict):
        raise ValueError("'input_gate.reference.ranges' is not an object")
    for name, span in ranges.items():
        if not (isinstance(span, list) and len(span) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in span)):
            raise ValueError(f"'input_gate.reference.ranges.{name}' is not two finite numbers")
    return ref


DEFAULT_RULES = GateRules()


class NotChestRadiograph(ImageError):
    """A decision, not a broken file: the input is not a chest radiograph, so it gets no label."""

    def __init__(self, path, rule: str, detail: str):
        self.rule = rule
        self.detail = detail
        super().__init__(path, f"not a chest radiograph: {detail}")


@dataclass(frozen=True)
class Decision:
    """What the gate decided about one input: accepted or refused (with the rule), and whether an
    accepted film is unlike the training films (the statistics outside their reference range)."""

    accepted: bool
    rule: str = ""  # the rule that refused it
    reason: str = ""  # one line, e.g. "not a chest radiograph: Modality MR"
    unlike_training: tuple[str, ...] = ()  # statistics outside the training films' range
    statistics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "rule": self.rule, "reason": self.reason,
                "unlike_training": list(self.unlike_training), "statistics": self.statistics}


# --------------------------------------------------------------------------- DICOM rules
def check_header(header: dict, rules: GateRules = DEFAULT_RULES) -> tuple[str, str] | None:
    """(rule, detail) of the first DICOM rule the header breaks, or None when it passes.

    `header`: plain strings as `xray_edge.dicom.read_header` returns them ("" when absent).
    """
    modality = header.get("Modality", "").upper()
    if modality not in rules.modalities:
        return "modality", f"Modality {modality or '(none)'}"
    sop = header.get("SOPClassUID", "")
    image_type = [x.strip().upper() for x in header.get("ImageType", "").split("\\")]
    if rules.original_only and sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary_capture", "a secondary capture (a screenshot or scan of an image)"
    if rules.original_only and "SECONDARY" in image_type:
        return "secondary_capture", f"ImageType {header['ImageType']} (a derived secondary image)"
    if rules.original_only and header.get("ConversionType", ""):
        return "secondary_capture", f"ConversionType {header['ConversionType']} (a converted image, not the film)"
    if rules.single_frame and _frames(header.get("NumberOfFrames", "")) > 1:
        return "single_frame", f"{header['NumberOfFrames']} frames (a series or cine, not a film)"
    part = header.get("BodyPartExamined", "").upper()
    if part and part not in rules.body_parts:
        return "body_part", f"BodyPartExamined {part}"
    view = header.get("ViewPosition", "").upper()
    if view and view not in rules.views:
        return "view", f"ViewPosition {view} (not a frontal view)"
    return None


def _frames(v: str) -> int:
    try:
        return int(float(v))
    except ValueError:
        return 1


# --------------------------------------------------------------------------- image statistics
def image_statistics(image: np.ndarray) -> dict[str, float]:
    """The gate's statistics of one model input (uint8 H x W x 3); about 1 ms at 200 x 200.

    colour: share of pixels whose channels differ by more than 24 levels (0 for an X-ray).
    contrast: standard deviation of the grey levels.
    roughness: mean absolute difference of neighbouring pixels over the contrast (noise ~1,
        a film ~0.05).
    white / black: share of grey levels above 247 / below 8.
    flat: the largest share of grey levels in one band of 8 levels, pure black and white aside
        (a page's background: 0.8; a film: under 0.36).
    symmetry: correlation of the image with its mirror image (left-right).
    mediastinum: the central column band's mean grey minus the lung bands', over the contrast,
        on the middle three fifths of the rows (a frontal chest film: positive).
    structure: the share of the grey-level variance left in the means of an 8 x 8 grid of blocks
        (a body's layout: over 0.4; noise and fine texture: near 0).
    falloff: the steepest fall of the power spectrum from one octave to the next, 1 to 32 cycles
        per image, as an exponent (a film's spectrum falls like a power law, k^-2 to k^-5; noise
        blurred at one scale falls off a cliff there, k^-6 and steeper).
    lungs: the median grey of the bottom centre (heart, diaphragm, spine: rows 80-95%, columns
        40-60%) minus the darkest tenth of the lung fields (rows 30-65%, columns 20-40% and
        60-80%), over the contrast (a chest film's lungs hold air: positive, frontal or lateral).
    edges: the kurtosis of the neighbour differences (a film's sharp edges, body outline, ribs,
        bones, diaphragm, between smooth regions make it heavy-tailed, over 5; noise and clouds,
        blurred or not, have Gaussian differences: 3).
    posterized: the share of the pixels on spikes of the grey-level histogram (levels 8-247
        holding over three times the mean of their +-4 neighbours): a stretched 8-bit image or a
        drawing in a few tones (a film's histogram is smooth: under 0.2).
    likeness: `xray_edge.likeness`, a score fitted on the layout and the statistics above that
        weighs them together (a film of a new source: above 0 in 199 of 200; the grey photographs,
        icons and diagrams that pass every bound above: mostly below).
    """
    stats, features = measure(image)
    stats["likeness"] = likeness.score(features)
    return stats


def measure(image: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The statistics of `image_statistics` but likeness, and the features likeness weighs (its
    fitting tool calls this)."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[:, :, None]
    # channel by channel: numpy's reductions over a last axis of 3 are ten times slower
    channels = [x[:, :, c] for c in range(x.shape[2])]
    hi, lo, total = channels[0], channels[0], channels[0].astype(np.float32)
    for c in channels[1:]:
        hi, lo = np.maximum(hi, c), np.minimum(lo, c)
        total += c
    chroma = hi - lo  # uint8: hi >= lo, no wrap-around
    g = total / len(channels)
    stats = {"colour": float((chroma > 24).mean()), **_grey_statistics(g)}
    # the likeness is fitted at one size: a model of another size has it measured there
    at = likeness.at_size(g)
    return stats, likeness.features(at, stats if at is g else {**stats, **_grey_statistics(at)})


def _grey_statistics(g: np.ndarray) -> dict[str, float]:
    """The statistics of `image_statistics` but colour and likeness, of a float grey image."""
    mean = float(g.mean())
    centred = g - mean
    power = float(np.vdot(centred, centred))
    contrast = (power / g.size) ** 0.5
    scale = max(contrast, 1e-6)
    dx, dy = np.diff(g, axis=1), np.diff(g, axis=0)
    rough = (float(np.abs(dx).mean()) + float(np.abs(dy).mean())) / 2 / scale
    symmetry = float(np.vdot(centred, centred[:, ::-1].copy()) / max(power, 1e-6))
    h, w = g.shape
    col = g[h // 5: 4 * h // 5].mean(axis=0)
    centre = col[int(w * 0.42):int(w * 0.58)].mean()
    lung_bands = (col[int(w * 0.15):int(w * 0.35)].mean() + col[int(w * 0.65):int(w * 0.85)].mean()) / 2
    levels = np.bincount(g.astype(np.uint8).ravel(), minlength=256)
    bands = levels.reshape(32, 8).sum(axis=1)
    return {"contrast": contrast, "roughness": float(rough),
            "white": float((g > 247).mean()), "black": float((g < 8).mean()),
            "flat": float(bands[1:31].max() / g.size),
            "symmetry": symmetry, "mediastinum": float((centre - lung_bands) / scale),
            "structure": _structure(g, power), "falloff": _falloff(centred),
            "lungs": _lungs(g) / scale, "edges": _edges(dx, dy), "posterized": _posterized(levels)}


def _edges(dx: np.ndarray, dy: np.ndarray) -> float:
    """Kurtosis of the neighbour differences (4th moment over the squared 2nd, about their mean)."""
    n = dx.size + dy.size
    mean = (float(dx.sum()) + float(dy.sum())) / n
    dx, dy = dx - mean, dy - mean
    sq_x, sq_y = dx * dx, dy * dy
    m2 = (float(sq_x.sum()) + float(sq_y.sum())) / n
    m4 = (float(np.vdot(sq_x, sq_x)) + float(np.vdot(sq_y, sq_y))) / n
    return m4 / max(m2 * m2, 1e-12)


def _posterized(levels: np.ndarray) -> float:
    """Share of the pixels on spikes of the grey-level histogram, pure black and white aside."""
    local = np.convolve(levels, np.ones(9) / 9, mode="same")
    spikes = levels > 3 * local
    spikes[:8] = spikes[248:] = False
    return float(levels[spikes].sum() / max(levels.sum(), 1))


def _structure(g: np.ndarray, power: float) -> float:
    h, w = g.shape
    bh, bw = h // 8, w // 8
    blocks = g[:bh * 8, :bw * 8].reshape(8, bh, 8, bw).mean(axis=(1, 3))
    return float(blocks.var() * g.size / max(power, 1e-6))


_OCTAVES = (1, 2, 4, 8, 16, 32)  # cycles per image


@lru_cache(maxsize=8)
def _octave_bins(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the rfft2 frequencies of an h x w input fall among the octave bands: (indices of
    those in a band, their band, frequencies per band). Only whole bands below the Nyquist limit
    count (a 48-pixel input has bands up to 16 cycles)."""
    top = max([e for e in _OCTAVES if e <= min(h, w) // 2] or [_OCTAVES[0]])
    fy, fx = np.fft.fftfreq(h) * h, np.fft.rfftfreq(w) * w
    k = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).ravel()
    bins = np.searchsorted(_OCTAVES, k, side="right") - 1
    keep = (k >= _OCTAVES[0]) & (k < top)
    return np.flatnonzero(keep), bins[keep], np.bincount(bins[keep])


def _falloff(centred: np.ndarray) -> float:
    idx, bins, counts = _octave_bins(*centred.shape)
    if len(counts) < 2:  # an input too small to have two octaves: no evidence either way
        return 0.0
    power = np.abs(np.fft.rfft2(centred).ravel()[idx]) ** 2
    mean = np.bincount(bins, weights=power, minlength=len(counts)) / counts
    return float(np.diff(np.log2(mean + 1e-6)).min())


def _lungs(g: np.ndarray) -> float:
    h, w = g.shape
    rows = slice(int(h * 0.3), int(h * 0.65))
    fields = np.concatenate([g[rows, int(w * 0.2):int(w * 0.4)].ravel(),
                             g[rows, int(w * 0.6):int(w * 0.8)].ravel()])
    darkest_tenth = np.partition(fields, len(fields) // 10)[len(fields) // 10]
    # the median, not the mean: a small bright vertebra on black air is not a dense centre
    centre = g[int(h * 0.8):int(h * 0.95), int(w * 0.4):int(w * 0.6)].ravel()
    return float(np.partition(centre, len(centre) // 2)[len(centre) // 2] - darkest_tenth)


def check_statistics(stats: dict, rules: GateRules = DEFAULT_RULES) -> tuple[str, str] | None:
    """(rule, detail) of the first statistic out of bounds, or None."""
    for bound_name, reason in _REASONS.items():
        kind, name = bound_name.split("_", 1)
        bound, v = getattr(rules, bound_name), stats[name]
        if (kind == "max" and v > bound) or (kind == "min" and v < bound):
            return name, f"{reason} ({name} {v:.3g}, {kind} {bound:g})"
    return None


def unlike_training(stats: dict, rules: GateRules = DEFAULT_RULES) -> tuple[str, ...]:
    """Names of the statistics outside the training films' reference range (empty without one)."""
    out = []
    for name, span in (rules.reference.get("ranges") or {}).items():
        if name in stats and isinstance(span, list) and len(span) == 2:
            if not span[0] <= stats[name] <= span[1]:
                out.append(name)
    return tuple(out)


# A film is flagged when a statistic lies beyond the training films' 1st-99th percentiles widened
# by this share of their span on each side (make gate-eval: the flag rates it gives).
REFERENCE_PERCENTILES = (1.0, 99.0)
REFERENCE_MARGIN = 0.25
_REFERENCE_STATS = ("contrast", "roughness", "white", "black", "flat", "symmetry", "mediastinum")


def reference_ranges(images, percentiles=REFERENCE_PERCENTILES, margin: float = REFERENCE_MARGIN) -> dict:
    """The reference of the films a model was made from: the range of each statistic over `images`.

    Export records it in the manifest (input_gate.reference) from the films it checks parity on
    (validation and test splits, the training films' source), so `unlike_training` can flag a
    film unlike all of them. {} when there are no images.
    """
    return reference_of_statistics([image_statistics(im) for im in images], percentiles, margin)


def reference_of_statistics(rows: list[dict], percentiles=REFERENCE_PERCENTILES,
                            margin: float = REFERENCE_MARGIN) -> dict:
    """`reference_ranges` from statistics already computed (one dict per film)."""
    if not rows:
        return {}
    ranges = {}
    for k in _REFERENCE_STATS:
        lo, hi = (float(v) for v in np.percentile([r[k] for r in rows], percentiles))
        pad = margin * (hi - lo)
        ranges[k] = [round(lo - pad, 4), round(hi + pad, 4)]
    return {"ranges": ranges, "percentiles": list(percentiles), "margin": margin, "images": len(rows)}


def rules_for_films(images, rules: GateRules = DEFAULT_RULES) -> dict:
    """`rules` with the reference of these films, as the manifest's input_gate records them.

    Only the films the gate accepts count: one it refuses would widen the ranges it flags by."""
    rows = [st for st in map(image_statistics, images) if check_statistics(st, rules) is None]
    return replace(rules, reference=reference_of_statistics(rows)).to_dict()


# --------------------------------------------------------------------------- entry point
def decide_image(image: np.ndarray, rules: GateRules = DEFAULT_RULES) -> Decision:
    """The statistics' decision on a decoded model input."""
    stats = image_statistics(image)
    broken = check_statistics(stats, rules)
    if broken is not None:
        return Decision(False, broken[0], f"not a chest radiograph: {broken[1]}", statistics=stats)
    return Decision(True, unlike_training=unlike_training(stats, rules), statistics=stats)


def check_input(path: str | os.PathLike, spec=None, rules: GateRules = DEFAULT_RULES
                ) -> tuple[Decision, np.ndarray | None]:
    """Decide whether a file is a chest radiograph; the one gate of classify, calibrate, explain
    and a service.

    Args:
        path: any input `load_image` takes.
        spec: the model's `Preprocessing` (default: the default recipe).
        rules: the model's `GateRules`.

    Returns:
        (Decision, the model input array when accepted, else None).

    Raises:
        ImageError: the file is not a usable image (a broken file, not a decision).

    Example:
        >>> decision, image = check_input("scan.dcm")
        >>> decision.accepted, decision.reason
        (False, 'not a chest radiograph: Modality MR')
    """
    from xray_edge.decode import check_file, is_dicom
    from xray_edge.preprocess import DEFAULT, load_image

    p = Path(path)
    check_file(p)
    if is_dicom(p):
        from xray_edge.dicom import read_header

        broken = check_header(read_header(p), rules)
        if broken is not None:  # no pixel is decoded
            return Decision(False, broken[0], f"not a chest radiograph: {broken[1]}"), None
    spec = spec or DEFAULT
    plain = load_image(p, spec.geometry)  # judged before any intensity step, which hides what it measures
    decision = decide_image(plain, rules)
    return decision, spec.adjust(plain) if decision.accepted else None


def load_checked(path, spec=None, rules: GateRules = DEFAULT_RULES) -> tuple[np.ndarray, Decision]:
    """`check_input` for loops: (image, decision), or NotChestRadiograph (an ImageError) raised."""
    decision, image = check_input(path, spec, rules)
    if not decision.accepted:
        raise NotChestRadiograph(path, decision.rule, decision.reason.split(": ", 1)[1])
    return image, decision


def loader(rules: GateRules = DEFAULT_RULES):
    """`load(path, spec) -> image` for `load_images`: refused inputs become NotChestRadiograph."""
    return lambda path, spec: load_checked(path, spec, rules)[0]


def summary(rules: GateRules) -> str:
    """The rules in one line, for `xray-edge info`."""
    bounds = ", ".join(f"{name.split('_', 1)[1]} {'<=' if name.startswith('max') else '>='} "
                       f"{getattr(rules, name):g}" for name in _REASONS)
    ref = rules.reference
    flag = (f"; flags films outside the statistics of {ref['images']} films of its training source"
            if ref.get("images") else "; no reference of the training films (no 'unlike training' flag)")
    return (f"DICOM: Modality {'/'.join(rules.modalities)}, body part {'/'.join(rules.body_parts)} "
            f"and view {'/'.join(rules.views)} where given"
            f"{', one frame' if rules.single_frame else ''}{', no secondary captures' if rules.original_only else ''}"
            f". Any image: {bounds}{flag}")


def own_gate(loaded) -> dict:
    """The input_gate a loaded model records: its manifest's, else its file's ({}: none)."""
    manifest = loaded.resolved.manifest
    return (manifest is not None and manifest.input_gate) or loaded.info.extra.get("input_gate") or {}


def rules_for(loaded) -> GateRules:
    """The gate of a loaded model: its own input_gate (`own_gate`), else the defaults.

    Raises:
        ModelError: a malformed input_gate, in one line.
    """
    try:
        return GateRules.from_dict(own_gate(loaded))
    except ValueError as exc:
        raise ModelError(f"{loaded.path}: {exc}") from None
