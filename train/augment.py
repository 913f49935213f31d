"""On-device image augmentation in JAX, matching torchvision.transforms.v2.

Every function takes a batch of NHWC images of one fixed shape (uint8 in
0..255 or float in 0..1) and is jit-compilable. Outputs are float32 NHWC in
0..1, except that ``center_crop`` and ``random_horizontal_flip`` keep the
input dtype and ``normalize`` and the composed transforms return normalized
values.
Random functions take one PRNG key for the whole batch and split it into one
key per example, so every example gets its own draw.

Equivalence with torchvision holds for torchvision's *float* pipeline, i.e.
``ToDtype(float32, scale=True)`` applied first: torchvision's uint8 kernels
round to integers after every step, these functions never do.

Resizing is done with explicit interpolation matrices (one ``[out, in]``
matrix per spatial axis and example) applied with two einsums. This makes
"crop a per-example box, then resize it" a single fixed-shape op, and it
reproduces torch's edge handling exactly: taps outside the crop box are
clamped (``antialias=False``) or dropped and renormalized (``antialias=True``,
PIL-style), never read from the pixels around the box.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, as used by torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_INTERPOLATIONS = ("bilinear", "bicubic")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Settings of the train and eval transforms (hashable: a static jit arg).

    The defaults are torchvision's ImageNet classification recipe:
    ``RandomResizedCrop(224) + RandomHorizontalFlip()`` for training and
    ``Resize(256) + CenterCrop(224)`` for evaluation, then ``Normalize``.

    Attributes:
        crop_size: Output side length of both transforms.
        resize_size: Shorter side after the eval resize (before center crop).
        scale: Range of the random crop's area as a fraction of the image.
        ratio: Range of the random crop's aspect ratio (width / height).
        flip_prob: Probability of a horizontal flip per example.
        brightness: Color-jitter strength (factor in [max(0, 1-b), 1+b]).
        contrast: Color-jitter strength (factor in [max(0, 1-c), 1+c]).
        saturation: Color-jitter strength (factor in [max(0, 1-s), 1+s]).
        hue: Color-jitter strength (shift in [-h, h], h <= 0.5).
        jitter_random_order: Apply the enabled jitter ops in a random order
            per example, like torchvision's ColorJitter; else the fixed order
            brightness, contrast, saturation, hue.
        mean: Per-channel mean subtracted by the normalization (0..1 scale).
        std: Per-channel std divided out by the normalization.
        channels: Channels the model wants (1 or 3). Grayscale inputs are
            replicated to 3 channels; RGB inputs are converted to luma for 1.
        interpolation: "bilinear" or "bicubic".
        antialias: torchvision's ``antialias`` flag of the resizes (default
            True, as in torchvision.transforms.v2).
        eval_prepared: The eval images arrive resized and center-cropped to
            ``crop_size`` (``train.data`` did torchvision's eval transform on
            the host, for variable-size images): ``eval_transform`` only
            normalises them.
    """

    crop_size: int = 224
    resize_size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_random_order: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    antialias: bool = True
    eval_prepared: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need {self.channels} entries (channels)"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be >= 0")
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad scale {self.scale} or ratio {self.ratio}")


def to_float(images: jax.Array) -> jax.Array:
    """Converts images to float32 in 0..1.

    Args:
        images: uint8 images (0..255) or float images (already 0..1).

    Returns:
        float32 array of the same shape.
    """
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def to_channels(images: jax.Array, channels: int) -> jax.Array:
    """Makes NHWC images have 1 or 3 channels.

    Args:
        images: NHWC images with 1 or 3 channels.
        channels: Wanted channel count, 1 or 3. 1 -> 3 replicates the gray
            channel; 3 -> 1 takes torchvision's grayscale (luma).

    Returns:
        NHWC images with ``channels`` channels: same dtype for 1 -> 3,
        float32 for 3 -> 1.
    """
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return jnp.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        return rgb_to_grayscale(to_float(images))
    raise ValueError(f"cannot convert {have} channels to {channels}")


def rgb_to_grayscale(images: jax.Array) -> jax.Array:
    """Luma of float RGB NHWC images, shape ``[..., 1]`` (torchvision weights)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2])[..., None]


# --------------------------------------------------------------------------
# Resizing.


def _cubic(x: jax.Array, a: float) -> jax.Array:
    """Keys' cubic convolution kernel."""
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(
    out_size: int,
    in_size: int,
    start: jax.Array | int = 0,
    length: jax.Array | int | None = None,
    *,
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> jax.Array:
    """Interpolation matrix that crops ``[start, start+length)`` and resizes it.

    Replicates torch.nn.functional.interpolate (align_corners=False) on the
    cropped axis: with ``antialias=False`` bilinear/bicubic (a=-0.75) taps
    whose index falls outside the crop are clamped to its edge; with
    ``antialias=True`` the PIL-style kernel (bicubic a=-0.5) is widened by the
    downscale factor and weights outside the crop are dropped, rows
    renormalized. ``start`` and ``length`` may be traced integers.

    Args:
        out_size: Output length (static).
        in_size: Input axis length (static).
        start: First input index of the crop.
        length: Crop length (defaults to ``in_size - start``).
        interpolation: "bilinear" or "bicubic".
        antialias: As torchvision's ``antialias``.

    Returns:
        float32 ``[out_size, in_size]`` matrix; ``out = W @ in`` along the axis.
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    if length is None:
        length = in_size - start
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    center = scale * (jnp.arange(out_size, dtype=jnp.float32) + 0.5)
    pos = jnp.arange(in_size, dtype=jnp.float32) - start  # index inside the crop
    inside = (pos >= 0) & (pos < length)
    if antialias:
        support_in_taps = 1.0 if interpolation == "bilinear" else 2.0
        invscale = jnp.where(scale >= 1.0, 1.0 / scale, 1.0)
        x = (pos[None, :] + 0.5 - center[:, None]) * invscale
        if interpolation == "bilinear":
            w = jnp.maximum(0.0, 1.0 - jnp.abs(x))
        else:
            w = _cubic(x, -0.5)
        # torch evaluates the kernel only within its support window.
        w = jnp.where(inside[None, :] & (jnp.abs(x) < support_in_taps), w, 0.0)
        return w / jnp.sum(w, axis=1, keepdims=True)
    src = center - 0.5
    if interpolation == "bilinear":
        src = jnp.maximum(src, 0.0)
        offsets, a = (0, 1), None
    else:
        offsets, a = (-1, 0, 1, 2), -0.75
    i0 = jnp.floor(src)
    t = src - i0
    w = jnp.zeros((out_size, in_size), jnp.float32)
    for off in offsets:
        tap = i0 + off
        coeff = (1.0 - jnp.abs(t - off)) if a is None else _cubic(t - off, a)
        index = jnp.clip(tap, 0.0, length - 1.0) + start
        w = w + coeff[:, None] * (index[:, None] == jnp.arange(in_size, dtype=jnp.float32)[None, :])
    return w


def _apply_weights(images: jax.Array, wy: jax.Array, wx: jax.Array) -> jax.Array:
    """Applies per-example ``[B, out_h, H]`` and ``[B, out_w, W]`` matrices."""
    rows = jnp.einsum("boh,bhwc->bowc", wy, images, precision=_HIGHEST)
    return jnp.einsum("bpw,bowc->bopc", wx, rows, precision=_HIGHEST)


def crop_and_resize(
    images: jax.Array,
    boxes: jax.Array,
    size: int | tuple[int, int],
    *,
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> jax.Array:
    """Crops one box per example and resizes it, like torchvision's ``resized_crop``.

    Args:
        images: NHWC batch (uint8 or float 0..1).
        boxes: int ``[N, 4]`` rows of (top, left, height, width), inside the image.
        size: Output size, int or (height, width).
        interpolation: "bilinear" or "bicubic".
        antialias: As torchvision's ``antialias``.

    Returns:
        float32 ``[N, out_h, out_w, C]``.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, height, width, _ = images.shape
    boxes = jnp.asarray(boxes)
    kw = dict(interpolation=interpolation, antialias=antialias)
    wy = jax.vmap(lambda s, n: resize_weights(out_h, height, s, n, **kw))(boxes[:, 0], boxes[:, 2])
    wx = jax.vmap(lambda s, n: resize_weights(out_w, width, s, n, **kw))(boxes[:, 1], boxes[:, 3])
    return _apply_weights(to_float(images), wy, wx)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) of torchvision ``Resize(size)`` for an int size.

    Args:
        height: Input height.
        width: Input width.
        size: Wanted length of the shorter side.

    Returns:
        (new_height, new_width); the longer side is truncated like torchvision.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """Top-left corner of torchvision's ``CenterCrop`` (Python rounding, as there)."""
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def resize(
    images: jax.Array,
    size: int | tuple[int, int],
    *,
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> jax.Array:
    """torchvision ``Resize``: an int resizes the shorter side, a pair sets (h, w).

    Args:
        images: NHWC batch (uint8 or float 0..1).
        size: Shorter side length, or (height, width).
        interpolation: "bilinear" or "bicubic".
        antialias: As torchvision's ``antialias``.

    Returns:
        float32 resized batch.
    """
    _, height, width, _ = images.shape
    out_h, out_w = resized_shape(height, width, size) if isinstance(size, int) else size
    return _resize_rows_cols(images, out_h, out_w, (0, out_h), (0, out_w), interpolation, antialias)


def _resize_rows_cols(images, out_h, out_w, rows, cols, interpolation, antialias):
    """Resizes to (out_h, out_w) but computes only output ``rows`` x ``cols``."""
    n, height, width, _ = images.shape
    kw = dict(interpolation=interpolation, antialias=antialias)
    wy = resize_weights(out_h, height, **kw)[rows[0] : rows[1]]
    wx = resize_weights(out_w, width, **kw)[cols[0] : cols[1]]
    wy = jnp.broadcast_to(wy, (n,) + wy.shape)
    wx = jnp.broadcast_to(wx, (n,) + wx.shape)
    return _apply_weights(to_float(images), wy, wx)


def center_crop(images: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """torchvision ``CenterCrop``; zero-pads first when the crop is larger.

    Args:
        images: NHWC batch.
        size: Crop side, or (height, width).

    Returns:
        The cropped batch, same dtype.
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    _, height, width, _ = images.shape
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        images = jnp.pad(
            images, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        )
        height, width = images.shape[1:3]
    top, left = center_crop_box(height, width, crop_h, crop_w)
    return images[:, top : top + crop_h, left : left + crop_w, :]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x - mean) / std`` per channel, on 0..1 images (uint8 is scaled first).

    Args:
        images: NHWC batch.
        mean: One value per channel.
        std: One value per channel.

    Returns:
        float32 normalized batch.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (to_float(images) - mean) / std


# --------------------------------------------------------------------------
# Random geometry.


def sample_crop_boxes(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    extent: jax.Array | None = None,
) -> jax.Array:
    """Samples RandomResizedCrop boxes with torchvision's semantics.

    Each example draws ``attempts`` (area fraction, log-uniform aspect ratio)
    pairs at once and keeps the first that fits, like torchvision's loop of 10
    tries; if none fits, it takes torchvision's central fallback crop.

    Args:
        key: PRNG key for the batch.
        batch: Number of boxes.
        height: Image height.
        width: Image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the aspect ratio width / height.
        attempts: Tries before the fallback.
        extent: Optional int ``[batch, 2]`` (height, width) of each example's
            image in the top-left corner of its ``height`` x ``width`` array (the
            rest is padding): boxes are drawn from that image alone, as
            torchvision draws them from the whole image.

    Returns:
        int32 ``[batch, 4]`` of (top, left, height, width).
    """
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    if extent is None:
        # The fallback depends only on static shapes, so it is computed in Python.
        in_ratio = width / height
        if in_ratio < min(ratio):
            fb_w, fb_h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            fb_h, fb_w = height, int(round(height * max(ratio)))
        else:
            fb_w, fb_h = width, height
        fallback = jnp.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w], jnp.int32)
        sizes = jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))
        fallbacks = jnp.broadcast_to(fallback, (batch, 4))
    else:
        sizes = jnp.clip(jnp.asarray(extent, jnp.int32), 1, jnp.array([height, width]))
        h, w = sizes[:, 0], sizes[:, 1]
        in_ratio = w / h
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fb_w = jnp.where(wide, jnp.round(h * max(ratio)).astype(jnp.int32), w)
        fb_h = jnp.where(narrow, jnp.round(w / min(ratio)).astype(jnp.int32), h)
        fallbacks = jnp.stack([(h - fb_h) // 2, (w - fb_w) // 2, fb_h, fb_w], axis=1)

    def one(k, size, fallback):
        # A single draw per example: every separate jax.random call adds a
        # threefry hash to the compiled graph, and compile time dominates here.
        height, width = size[0], size[1]
        area = (height * width).astype(jnp.float32)
        u = jax.random.uniform(k, (2 * attempts + 2,))
        target = area * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
        aspect = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[attempts : 2 * attempts])
        w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
        h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = jnp.argmax(fits)
        h, w = h[first], w[first]
        top = jnp.minimum(jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
        left = jnp.minimum(jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
        return jnp.where(jnp.any(fits), jnp.stack([top, left, h, w]), fallback)

    return jax.vmap(one)(jax.random.split(key, batch), sizes, fallbacks)


def random_resized_crop(
    key: jax.Array,
    images: jax.Array,
    out_size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    interpolation: str = "bilinear",
    antialias: bool = True,
    extent: jax.Array | None = None,
) -> jax.Array:
    """torchvision ``RandomResizedCrop``, one independent box per example.

    Args:
        key: PRNG key for the batch.
        images: NHWC batch (uint8 or float 0..1).
        out_size: Output side, or (height, width).
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the aspect ratio width / height.
        interpolation: "bilinear" or "bicubic".
        antialias: As torchvision's ``antialias``.
        extent: Optional int ``[N, 2]`` size of each image in the top-left
            corner of its padded array (``sample_crop_boxes``).

    Returns:
        float32 ``[N, out_h, out_w, C]``.
    """
    n, height, width, _ = images.shape
    boxes = sample_crop_boxes(key, n, height, width, scale, ratio, extent=extent)
    return crop_and_resize(
        images, boxes, out_size, interpolation=interpolation, antialias=antialias
    )


def random_horizontal_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
    """Flips each example left-right with probability ``p``.

    Args:
        key: PRNG key for the batch.
        images: NHWC batch.
        p: Flip probability.

    Returns:
        The batch, same dtype.
    """
    flip = jax.vmap(lambda k: jax.random.bernoulli(k, p))(jax.random.split(key, images.shape[0]))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


# --------------------------------------------------------------------------
# Color. Factors are scalars or one value per example.


def _per_example(factor):
    return jnp.reshape(jnp.asarray(factor, jnp.float32), (-1, 1, 1, 1))


def _blend(a, b, ratio):
    return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def adjust_brightness(images: jax.Array, factor) -> jax.Array:
    """torchvision ``adjust_brightness``: blend with black, clamp to 0..1.

    Args:
        images: NHWC batch.
        factor: Scalar or ``[N]`` factors (>= 0).

    Returns:
        float32 batch.
    """
    return jnp.clip(to_float(images) * _per_example(factor), 0.0, 1.0)


def adjust_contrast(images: jax.Array, factor) -> jax.Array:
    """torchvision ``adjust_contrast``: blend with the mean of the grayscale image.

    Args:
        images: NHWC batch (1 or 3 channels).
        factor: Scalar or ``[N]`` factors (>= 0).

    Returns:
        float32 batch.
    """
    x = to_float(images)
    gray = rgb_to_grayscale(x) if x.shape[-1] == 3 else x
    mean = jnp.mean(gray, axis=(1, 2, 3), keepdims=True)
    return _blend(x, mean, _per_example(factor))


def adjust_saturation(images: jax.Array, factor) -> jax.Array:
    """torchvision ``adjust_saturation``: blend with the grayscale image.

    Args:
        images: NHWC batch; 1-channel images are returned unchanged, like PIL.
        factor: Scalar or ``[N]`` factors (>= 0).

    Returns:
        float32 batch.
    """
    x = to_float(images)
    if x.shape[-1] == 1:
        return x
    return _blend(x, rgb_to_grayscale(x), _per_example(factor))


def _rgb_to_hsv(x):
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    eqc = maxc == minc
    crange = maxc - minc
    s = crange / jnp.where(eqc, 1.0, maxc)
    divisor = jnp.where(eqc, 1.0, crange)[..., None]
    rc, gc, bc = jnp.moveaxis((maxc[..., None] - x) / divisor, -1, 0)
    # torchvision picks the hue formula by `maxc == r`, then `maxc == g`. Under
    # jit XLA may recompute x in two fusions with different FMA contraction,
    # so those float equalities can both fail; argmax (first max wins, the
    # same priority) always selects exactly one formula.
    which = jnp.argmax(x, axis=-1)
    h = jnp.select([which == 0, which == 1], [bc - gc, 2.0 + rc - bc], 4.0 + gc - rc)
    h = jnp.fmod(h * (1.0 / 6.0) + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = h * 6.0
    i = jnp.floor(h6)
    f = h6 - i
    i = jnp.mod(i.astype(jnp.int32), 6)
    q = jnp.clip((1.0 - s * f) * v, 0.0, 1.0)
    t = jnp.clip((s * f + (1.0 - s)) * v, 0.0, 1.0)
    p = jnp.clip((1.0 - s) * v, 0.0, 1.0)
    r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
    g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
    b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
    return jnp.stack([r, g, b], axis=-1)


def adjust_hue(images: jax.Array, factor) -> jax.Array:
    """torchvision ``adjust_hue``: rotate the hue in HSV space.

    Args:
        images: NHWC batch; 1-channel images are returned unchanged, like PIL.
        factor: Scalar or ``[N]`` shifts in [-0.5, 0.5] (fractions of a turn).

    Returns:
        float32 batch.
    """
    x = to_float(images)
    if x.shape[-1] == 1:
        return x
    h, s, v = _rgb_to_hsv(x)
    h = jnp.mod(h + _per_example(factor)[..., 0], 1.0)
    return _hsv_to_rgb(h, s, v)


_JITTER_OPS = (
    ("brightness", adjust_brightness),
    ("contrast", adjust_contrast),
    ("saturation", adjust_saturation),
    ("hue", adjust_hue),
)


def sample_jitter_params(
    key: jax.Array,
    batch: int,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    *,
    random_order: bool = True,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Draws ColorJitter factors and op order per example (torchvision ranges).

    Args:
        key: PRNG key for the batch.
        batch: Number of examples.
        brightness: Strength b: factor uniform in [max(0, 1-b), 1+b].
        contrast: Strength c: factor uniform in [max(0, 1-c), 1+c].
        saturation: Strength s: factor uniform in [max(0, 1-s), 1+s].
        hue: Strength h: shift uniform in [-h, h].
        random_order: Draw a random order per example; else the listed order.

    Returns:
        (factors, order): ``factors`` maps the enabled (non-zero) op names to
        ``[batch]`` float32 factors; ``order`` is int32 ``[batch, k]`` of
        indices into the enabled ops in listed order.
    """
    strengths = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    enabled = [name for name, _ in _JITTER_OPS if strengths[name] > 0]
    # One uniform draw per example (see sample_crop_boxes): k factors, then k
    # sort keys whose argsort is a uniformly random permutation.
    keys = jax.random.split(key, batch)
    u = jax.vmap(lambda k: jax.random.uniform(k, (2 * len(_JITTER_OPS),)))(keys)
    factors = {}
    for i, name in enumerate(enabled):
        s = strengths[name]
        lo, hi = (-s, s) if name == "hue" else (max(0.0, 1.0 - s), 1.0 + s)
        factors[name] = lo + (hi - lo) * u[:, i]
    if random_order:
        order = jnp.argsort(u[:, len(_JITTER_OPS) : len(_JITTER_OPS) + len(enabled)], axis=1)
    else:
        order = jnp.broadcast_to(jnp.arange(len(enabled)), (batch, len(enabled)))
    return factors, order.astype(jnp.int32)


def color_jitter(
    key: jax.Array,
    images: jax.Array,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    *,
    random_order: bool = True,
) -> jax.Array:
    """torchvision ``ColorJitter`` with independent factors per example.

    Ops with strength 0 are skipped, as in torchvision. With ``random_order``
    each example applies the enabled ops in its own random order (torchvision
    draws a permutation per call, i.e. per image); every slot evaluates each
    enabled op and selects, so the cost is k^2 op evaluations for k ops.

    Args:
        key: PRNG key for the batch.
        images: NHWC batch (uint8 or float 0..1).
        brightness: Strength, see ``sample_jitter_params``.
        contrast: Strength.
        saturation: Strength.
        hue: Strength (<= 0.5).
        random_order: Per-example random order, else brightness, contrast,
            saturation, hue.

    Returns:
        float32 batch in 0..1.
    """
    x = to_float(images)
    factors, order = sample_jitter_params(
        key, x.shape[0], brightness, contrast, saturation, hue, random_order=random_order
    )
    ops = [(fn, factors[name]) for name, fn in _JITTER_OPS if name in factors]
    if not random_order:
        for fn, f in ops:
            x = fn(x, f)
        return x

    def slot(i, x):
        # One loop body that evaluates every op and selects per example keeps
        # the compiled graph k times smaller than unrolling the k slots.
        choice = order[:, i][:, None, None, None]
        return jnp.select([choice == j for j in range(len(ops))], [fn(x, f) for fn, f in ops])

    return jax.lax.fori_loop(0, len(ops), slot, x)


# --------------------------------------------------------------------------
# Composed transforms.


def train_transform(key: jax.Array, images: jax.Array, cfg: AugmentConfig,
                    extent: jax.Array | None = None) -> jax.Array:
    """RandomResizedCrop -> HorizontalFlip -> [ColorJitter] -> Normalize.

    Args:
        key: PRNG key for the batch (use a fresh one per step).
        images: NHWC batch, uint8 or float 0..1, 1 or 3 channels.
        cfg: Transform settings (pass as a static argument under jit).
        extent: Optional int ``[N, 2]``: each image's size in the top-left
            corner of its padded array (``train.data``'s ``"fit"`` storage);
            the crops are drawn from it alone.

    Returns:
        float32 ``[N, crop, crop, cfg.channels]`` normalized batch.
    """
    k_crop, k_flip, k_jitter = jax.random.split(key, 3)
    x = random_resized_crop(
        k_crop,
        images,
        cfg.crop_size,
        cfg.scale,
        cfg.ratio,
        interpolation=cfg.interpolation,
        antialias=cfg.antialias,
        extent=extent,
    )
    x = random_horizontal_flip(k_flip, x, cfg.flip_prob)
    # Channel conversion after the crop: replicating a gray channel commutes
    # with every op here, and the cropped image is the cheaper one to copy.
    x = to_channels(x, cfg.channels)
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        x = color_jitter(
            k_jitter,
            x,
            cfg.brightness,
            cfg.contrast,
            cfg.saturation,
            cfg.hue,
            random_order=cfg.jitter_random_order,
        )
    return normalize(x, cfg.mean, cfg.std)


def eval_transform(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Resize(resize_size) -> CenterCrop(crop_size) -> Normalize, as torchvision.

    With ``cfg.eval_prepared`` the images are already resized and cropped:
    only Normalize (and the channel conversion) is left. Otherwise the resize
    and crop are one op: only the rows and columns of the resized image that
    survive the crop are computed.

    Args:
        images: NHWC batch, uint8 or float 0..1, 1 or 3 channels.
        cfg: Transform settings (pass as a static argument under jit).

    Returns:
        float32 ``[N, crop, crop, cfg.channels]`` normalized batch.
    """
    _, height, width, _ = images.shape
    crop = cfg.crop_size
    if cfg.eval_prepared:
        if (height, width) != (crop, crop):
            raise ValueError(f"eval_prepared images must be {crop}x{crop}, got {height}x{width}")
        return normalize(to_channels(to_float(images), cfg.channels), cfg.mean, cfg.std)
    out_h, out_w = resized_shape(height, width, cfg.resize_size)
    if crop > out_h or crop > out_w:
        resized = resize(
            images, cfg.resize_size, interpolation=cfg.interpolation, antialias=cfg.antialias
        )
        x = center_crop(resized, crop)
    else:
        top, left = center_crop_box(out_h, out_w, crop, crop)
        x = _resize_rows_cols(
            images,
            out_h,
            out_w,
            (top, top + crop),
            (left, left + crop),
            cfg.interpolation,
            cfg.antialias,
        )
    return normalize(to_channels(x, cfg.channels), cfg.mean, cfg.std)
