"""The tutorial's augmentation (zoom 0.2 + horizontal flip) as two small matrix products.

Zoom and flip of an image are separable: out = Ry @ img @ Rx^T, where Ry and Rx are bilinear
resampling matrices (one row per output pixel, two non-zero weights). Batched, that is two
einsums, which run at matmul speed on a GPU, where `keras.layers.RandomZoom`'s gather-based affine
transform is slow (figures: docs/training.md). Source coordinates are clamped, as ImageDataGenerator's default
`fill_mode="nearest"`; zoom factors for x and y are drawn independently, as it did.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="xray_edge")
class ZoomFlip(keras.layers.Layer):
    """Random zoom in [1 - zoom, 1 + zoom] per axis and random horizontal flip; training only."""

    def __init__(self, zoom: float = 0.2, flip: bool = True, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.zoom, self.flip, self.seed = zoom, flip, seed
        self._seed_gen = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or (self.zoom == 0 and not self.flip):
            return x
        batch = ops.shape(x)[0]
        h, w = x.shape[1], x.shape[2]
        zy = keras.random.uniform((batch,), 1 - self.zoom, 1 + self.zoom, seed=self._seed_gen)
        zx = keras.random.uniform((batch,), 1 - self.zoom, 1 + self.zoom, seed=self._seed_gen)
        if self.flip:
            coin = keras.random.uniform((batch,), 0, 1, seed=self._seed_gen)
            zx = ops.where(coin < 0.5, -zx, zx)
        ry = _resampler(zy, h, x.dtype)  # (B, H_out, H_in)
        rx = _resampler(zx, w, x.dtype)  # (B, W_out, W_in)
        x = ops.einsum("bij,bjkc->bikc", ry, x)
        return ops.einsum("blk,bikc->bilc", rx, x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "zoom": self.zoom, "flip": self.flip, "seed": self.seed}


def _resampler(factor, n: int, dtype):
    """(B, n, n) bilinear weights mapping output index i to source c + (i - c) * factor."""
    c = (n - 1) / 2.0
    grid = ops.cast(ops.arange(n), "float32") - c
    src = ops.clip(c + grid[None, :] * factor[:, None], 0.0, n - 1.0)  # (B, n)
    lo = ops.floor(src)
    frac = src - lo
    lo_i = ops.cast(lo, "int32")
    hi_i = ops.minimum(lo_i + 1, n - 1)
    weights = (ops.one_hot(lo_i, n) * (1.0 - frac)[..., None]
               + ops.one_hot(hi_i, n) * frac[..., None])
    return ops.cast(weights, dtype)


@keras.saving.register_keras_serializable(package="xray_edge")
class Photometric(keras.layers.Layer):
    """Training-only changes of how a film was exposed and stored, not of what it shows.

    Per image: contrast scaled around its mean by U[1 - s, 1 + s], gamma U[1 - s, 1 + s], Gaussian
    noise of sigma U[0, 8 s] grey levels; with chance `border`, an outer band (4-12% of each side)
    set to the image's mean, where hospitals burn in their markers. Pixels stay 0-255.
    """

    def __init__(self, strength: float = 0.3, border: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.border, self.seed = strength, border, seed
        self._seed_gen = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        b = ops.shape(x)[0]
        s = self.strength
        x = ops.cast(x, "float32")
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        if s > 0:
            contrast = keras.random.uniform((b, 1, 1, 1), 1 - s, 1 + s, seed=self._seed_gen)
            x = ops.clip(mean + (x - mean) * contrast, 0.0, 255.0)
            gamma = keras.random.uniform((b, 1, 1, 1), 1 - s, 1 + s, seed=self._seed_gen)
            x = 255.0 * ops.power(x / 255.0 + 1e-6, gamma)
            sigma = keras.random.uniform((b, 1, 1, 1), 0, 8 * s, seed=self._seed_gen)
            x = ops.clip(x + sigma * keras.random.normal(ops.shape(x), seed=self._seed_gen), 0.0, 255.0)
        if self.border > 0:
            h, w = x.shape[1], x.shape[2]
            band = keras.random.uniform((b, 1, 1, 1), 0.04, 0.12, seed=self._seed_gen)
            on = ops.cast(keras.random.uniform((b, 1, 1, 1), 0, 1, seed=self._seed_gen) < self.border, "float32")
            yy = ops.reshape(ops.abs(ops.cast(ops.arange(h), "float32") / (h - 1) - 0.5), (1, h, 1, 1))
            xx = ops.reshape(ops.abs(ops.cast(ops.arange(w), "float32") / (w - 1) - 0.5), (1, 1, w, 1))
            outer = ops.cast(ops.maximum(yy, xx) > 0.5 - band, "float32") * on
            x = x * (1 - outer) + mean * outer
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "border": self.border, "seed": self.seed}


@keras.saving.register_keras_serializable(package="xray_edge")
class Degrade(keras.layers.Layer):
    """Training-only copying losses, as films reach a publication or a viewer's export: with chance
    `chance` each, a Gaussian blur (sigma U[0.3, 1.5] px) and a JPEG-like re-compression (8 x 8
    block DCT, coefficients rounded to the standard luminance table at quality U[20, 90]).

    Both are matrix products, so they run on any Keras backend: the blur is the same separable
    Ry @ img @ Rx^T as `ZoomFlip`, the DCT is D @ block @ D^T. Pixels stay 0-255. A side that is not
    a multiple of 8 is compressed in its whole blocks only.
    """

    def __init__(self, chance: float = 0.5, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.chance, self.seed = chance, seed
        self._seed_gen = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.chance <= 0:
            return x
        b = ops.shape(x)[0]
        h, w = x.shape[1], x.shape[2]
        x = ops.cast(x, "float32")
        sigma = keras.random.uniform((b,), 0.3, 1.5, seed=self._seed_gen)
        blurred = ops.einsum("blk,bikc->bilc", _gaussian(sigma, w),
                             ops.einsum("bij,bjkc->bikc", _gaussian(sigma, h), x))
        x = _where_chance(self.chance, b, blurred, x, self._seed_gen)
        quality = keras.random.uniform((b,), 20, 90, seed=self._seed_gen)
        hb, wb = h - h % 8, w - w % 8
        if hb and wb:
            inner = _jpeg_blocks(x[:, :hb, :wb, :], quality)
            compressed = ops.concatenate([ops.concatenate([inner, x[:, :hb, wb:, :]], axis=2), x[:, hb:, :, :]], axis=1)
            x = _where_chance(self.chance, b, compressed, x, self._seed_gen)
        return ops.clip(x, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "chance": self.chance, "seed": self.seed}


def _where_chance(chance: float, b, new, old, seed_gen):
    on = keras.random.uniform((b, 1, 1, 1), 0, 1, seed=seed_gen) < chance
    return ops.where(on, new, old)


def _gaussian(sigma, n: int):
    """(B, n, n) row-normalised Gaussian weights of width sigma (pixels), edges renormalised."""
    i = ops.cast(ops.arange(n), "float32")
    d = i[None, :, None] - i[None, None, :]
    g = ops.exp(-0.5 * (d / sigma[:, None, None]) ** 2)
    return g / ops.sum(g, axis=2, keepdims=True)


# JPEG's standard luminance quantisation table (ITU-T T.81, Annex K) and the orthonormal 8-point DCT
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


def _dct_matrix():
    k = ops.cast(ops.arange(8), "float32")
    d = ops.cos((2 * k[None, :] + 1) * k[:, None] * (3.141592653589793 / 16))
    scale = ops.where(k == 0, (1 / 8) ** 0.5, (2 / 8) ** 0.5)
    return d * scale[:, None]


def _jpeg_blocks(x, quality):
    """x (B, H, W, C) with H, W multiples of 8, through JPEG's lossy step at each image's quality."""
    b = ops.shape(x)[0]
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    scale = ops.where(quality < 50, 5000 / quality, 200 - 2 * quality)  # libjpeg's quality scaling
    table = ops.maximum(ops.floor((ops.reshape(ops.convert_to_tensor(_LUMA, "float32"), (1, 8, 8))
                                   * scale[:, None, None] + 50) / 100), 1.0)
    d = _dct_matrix()
    # (B, 8, 8, blocks x channels): every tensor stays 4-D (TensorFlow broadcasts up to 5)
    blocks = ops.transpose(ops.reshape(x - 128.0, (b, h // 8, 8, w // 8, 8, c)), (0, 2, 4, 1, 3, 5))
    blocks = ops.reshape(blocks, (b, 8, 8, -1))
    coef = ops.einsum("uy,byxn,vx->buvn", d, blocks, d)
    q = table[:, :, :, None]
    coef = ops.round(coef / q) * q
    out = ops.reshape(ops.einsum("uy,buvn,vx->byxn", d, coef, d), (b, 8, 8, h // 8, w // 8, c))
    return ops.reshape(ops.transpose(out, (0, 3, 1, 4, 2, 5)), (b, h, w, c)) + 128.0
