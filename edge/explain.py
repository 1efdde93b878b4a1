"""Where the model looks: occlusion sensitivity through any runtime, drawn with Pillow only.

Occlusion needs nothing but the model's forward pass, so it runs on the device with the file
that classifies (int8 included) and no TensorFlow. A square patch of the 200x200 input is
replaced by the image's mean grey at each point of a grid; the drop in the explained class's
probability is that region's score (positive: the region supports the decision). A pixel's
attribution is the mean score of the patches that cover it (Zeiler and Fergus, 2014).

The heat map is drawn over the original file at its own aspect ratio, coloured by a small numpy
lookup table, with the label and probability in a caption (ImageDraw): no matplotlib.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from xray_edge.classify import decide
from xray_edge.errors import ImageError, first_line
from xray_edge.files import atomic_write_bytes, check_folder_writable, fit_name
from xray_edge.metadata import ModelInfo
from xray_edge.preprocess import load_display_image, load_image

FRAME = 0.15  # the outer band of each side where text, markers and borders sit


@dataclass(frozen=True)
class Occlusion:
    """The occlusion grid: `grid` x `grid` patch positions, each patch `patch` input pixels square.

    The default, 8 x 8 positions 25 px apart with 50 px patches (a quarter of the side; each
    pixel is covered by four patches), is 65 invokes per image; see docs/site.md for timings.
    """

    grid: int = 8
    patch: int = 50

    def windows(self, size: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of each patch, row-major, centred on the grid's cells."""
        stride = size / self.grid
        out = []
        for i in range(self.grid):
            for j in range(self.grid):
                cy, cx = (i + 0.5) * stride, (j + 0.5) * stride
                y0, x0 = int(round(cy - self.patch / 2)), int(round(cx - self.patch / 2))
                out.append((max(0, y0), min(size, y0 + self.patch), max(0, x0), min(size, x0 + self.patch)))
        return out


DEFAULT = Occlusion()


@dataclass
class Explanation:
    label: str
    probability: float  # of `label`, on the unoccluded image
    grid: np.ndarray  # [G, G] drop in P(label) when each patch is occluded
    pixels: np.ndarray  # [H, W] attribution of each input pixel (mean over covering patches)
    occlusion: Occlusion

    def to_dict(self) -> dict:
        return {"label": self.label, "probability": round(self.probability, 6),
                "method": "occlusion", "grid_size": self.occlusion.grid, "patch_px": self.occlusion.patch,
                "input_px": self.pixels.shape[0], "fill": "image mean",
                "scores": np.round(self.grid, 6).tolist(), **frame_share_record(self.pixels)}


def occlusion_scores(image: np.ndarray, score: Callable[[np.ndarray], np.ndarray],
                     occ: Occlusion = DEFAULT) -> tuple[float, np.ndarray, np.ndarray]:
    """Occlusion sensitivity of one uint8 [H, W, C] image.

    Args:
        score: uint8 batch [N, H, W, C] -> the explained class's probability [N]. A runtime on
            a device calls its batch-of-one backend per image; Keras may take the whole batch.
    Returns:
        (unoccluded score, [G, G] score drop per patch, [H, W] pixel attribution).
    """
    h, w = image.shape[:2]
    fill = np.round(image.reshape(-1, image.shape[-1]).mean(axis=0)).astype(image.dtype)
    wins = occ.windows(h)
    batch = np.repeat(image[None], len(wins) + 1, axis=0)
    for k, (y0, y1, x0, x1) in enumerate(wins, start=1):
        batch[k, y0:y1, x0:x1] = fill
    s = np.asarray(score(batch), np.float64).reshape(-1)
    drops = s[0] - s[1:]
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for d, (y0, y1, x0, x1) in zip(drops, wins):
        total[y0:y1, x0:x1] += d
        count[y0:y1, x0:x1] += 1
    return float(s[0]), drops.reshape(occ.grid, occ.grid), total / np.maximum(count, 1)


def frame_mask(shape: tuple[int, int], frame: float = FRAME) -> np.ndarray:
    """True on the outer `frame` share of each side: where labels, markers and borders sit."""
    h, w = shape
    m = np.ones((h, w), bool)
    m[int(round(h * frame)):h - int(round(h * frame)), int(round(w * frame)):w - int(round(w * frame))] = False
    return m


def share_inside(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution that falls inside `mask` (NaN when there is none)."""
    a = np.clip(np.asarray(attribution, np.float64), 0, None)
    total = a.sum()
    return float(a[mask].sum() / total) if total > 0 else float("nan")


def frame_share(attribution: np.ndarray, frame: float = FRAME) -> float:
    """The "frame share": positive attribution in the outer 15% band over all positive attribution.

    The band is 51% of the image's area, so attribution spread evenly scores 0.51; a model that
    reads the lungs scores well below that, one that reads corner labels or borders well above.
    """
    return share_inside(attribution, frame_mask(attribution.shape, frame))


NO_SHARE = "no patch lowers P(label) when covered (a uniform image, or a model that ignores it)"


def frame_share_record(attribution: np.ndarray) -> dict:
    """{"frame_share": x} for JSON and the PNG's text: null, with the reason, when undefined."""
    share = frame_share(attribution)
    if np.isfinite(share):
        return {"frame_share": share}
    return {"frame_share": None, "frame_share_note": NO_SHARE}


def explain_image(image: np.ndarray, predict_one: Callable[[np.ndarray], np.ndarray], labels: tuple[str, ...],
                  threshold: float | None, occ: Occlusion = DEFAULT) -> Explanation:
    """Classify one image batch-of-one as the runner does and explain the label it gets."""
    label, _ = decide(predict_one(image), ModelInfo(labels, threshold), threshold)
    k = labels.index(label)

    def score(batch: np.ndarray) -> np.ndarray:
        out = []
        for x in batch:
            p = np.asarray(predict_one(x), np.float64).reshape(-1)
            out.append((p[0] if k == 1 else 1 - p[0]) if p.size == 1 else p[k])
        return np.asarray(out)

    prob, grid, pixels = occlusion_scores(image, score, occ)
    return Explanation(label, prob, grid, pixels, occ)


def colour_lut() -> np.ndarray:
    """256 x 3 uint8: dark blue, red, yellow, white, like matplotlib's "hot"/"inferno" family."""
    anchors = np.array([[0, 0, 80], [200, 0, 40], [255, 140, 0], [255, 255, 120]], np.float64)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


_LUT = colour_lut()


def overlay(original: Image.Image, attribution: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """The positive attribution as a heat map over `original` (any size: the map is stretched to it).

    Zero attribution leaves the film as it is; the strongest region is `alpha` heat colour.
    """
    base = np.asarray(original.convert("RGB"), np.float64)
    a = np.clip(attribution, 0, None)
    a = a / a.max() if a.max() > 0 else a
    heat = np.asarray(Image.fromarray(a.astype(np.float32)).resize(original.size, Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0, 1)
    colour = _LUT[np.round(heat * 255).astype(np.uint8)].astype(np.float64)
    w = alpha * heat[..., None]
    return Image.fromarray(np.round(base * (1 - w) + colour * w).astype(np.uint8))


def captioned(picture: Image.Image, lines: list[str]) -> Image.Image:
    """`picture` above a black strip with `lines` of white text."""
    size = max(10, picture.width // 32)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 (e.g. Debian 12's): the fixed bitmap font
        font, size = ImageFont.load_default(), 11
    strip = (size + 4) * len(lines) + 8
    out = Image.new("RGB", (picture.width, picture.height + strip), (0, 0, 0))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, picture.height + 4 + i * (size + 4)), line, fill=(255, 255, 255), font=font)
    return out


def picture(path: Path, ex: Explanation, max_side: int = 512) -> tuple[Image.Image, str]:
    """The PNG for one image: the original at its aspect (longest side `max_side`), heat, caption."""
    original = load_display_image(path, max_side).convert("L")
    share = frame_share(ex.pixels)
    share_text = f"{share:.2f}" if np.isfinite(share) else "n/a (no patch lowers p)"
    caption = [f"{ex.label}  p={ex.probability:.3f}   frame share {share_text}",
               f"occlusion {ex.occlusion.grid}x{ex.occlusion.grid}, patch {ex.occlusion.patch} px of "
               f"{ex.pixels.shape[0]}",
               f"bright: covering it lowers P({ex.label})"]
    return captioned(overlay(original, ex.pixels), caption), caption[0]


def write_png(img: Image.Image, path: Path, caption: str, ex: Explanation) -> Path:
    """Atomic PNG; the caption and the score grid also go in its text chunks, for tools and tests."""
    meta = PngInfo()
    meta.add_text("caption", caption)
    meta.add_text("xray_edge_explain", json.dumps(ex.to_dict(), allow_nan=False))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return atomic_write_bytes(path, buf.getvalue())


def out_name(path: Path, used: set[str]) -> str:
    """`scan.jpg` -> `scan.explain.png`; a second `scan.*` from another folder gets `scan-2...`.

    A stem too long for the file system's 255-byte names once the suffix is added is cut (the
    write's temporary name is then cut in its turn, see `atomic_write_bytes`)."""
    stem, n = path.stem, 1
    name = fit_name(stem, ".explain.png")
    while name in used:
        n += 1
        name = fit_name(stem, f"-{n}.explain.png")
    used.add(name)
    return name


@dataclass(frozen=True)
class Explained:
    """One input explained: where its PNG went, and what it says."""

    path: Path
    png: Path
    explanation: Explanation

    def to_dict(self) -> dict:
        return {"path": os.fsdecode(self.path), "png": os.fsdecode(self.png), **self.explanation.to_dict()}


def explain_paths(items: Iterable[Path | ImageError], predict_one: Callable[[np.ndarray], np.ndarray],
                  info: ModelInfo, threshold: float | None, out_dir: Path, occ: Occlusion = DEFAULT,
                  max_side: int = 512, load: Callable = load_image) -> Iterator[Explained | ImageError]:
    """Explain each input in turn; a failure (decode or write) is yielded as an ImageError and
    the next input goes on. `out_dir` should have been checked with `check_out_dir` first.
    `load(path, spec)` decodes an input (the input gate's loader refuses what is not a film)."""
    used: set[str] = set()
    for item in items:
        if isinstance(item, ImageError):
            yield item
            continue
        path = Path(item)
        try:
            image = load(path, info.preprocessing)
            result = explain_image(image, predict_one, info.labels, threshold, occ)
            pic, caption = picture(path, result, max_side)
            png = out_dir / out_name(path, used)
            try:
                written = write_png(pic, png, caption, result)
            except OSError as exc:
                raise ImageError(path, f"cannot write {png}: {exc.strerror or first_line(exc)}") from None
        except ImageError as err:
            yield err
            continue
        yield Explained(path, written, result)


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and prove a file can be written in it, before any image is explained.

    Raises:
        XrayEdgeError: a file in the way, a read-only folder, ... (one line).
    """
    check_folder_writable(out_dir)
