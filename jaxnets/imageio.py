"""Images of any PIL mode as 8-bit RGB, without losing what they show.

PIL's ``convert("RGB")`` clips wider samples to 0..255: a 16-bit PNG comes out
almost all white, a float TIFF of 0..1 values almost all black (torchvision's own
loader does the same). :func:`to_rgb` scales them to 8 bits first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_rgb", "to_uint8"]


def to_rgb(image: Any) -> Any:
    """A PIL image in mode ``RGB``; 16-bit, 32-bit integer and float grayscale
    samples are scaled to 0..255 first (16-bit: the high byte; ``I`` above 255: by
    65535 / 255; ``F``: 0..1 taken as the full range, else clipped)."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.size and values.max() > 255):
            values = values / 257.0
        elif mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_uint8(pixels: Any) -> np.ndarray:
    """An image array as uint8, by :func:`to_rgb`'s rules: 16-bit integers
    divided by 257 (their high byte, rounded; as PIL's ``I;16``), wider integers
    so where the array's maximum is above 255 (as ``I``), floats times 255 where
    the array's maximum is at most 1 (as ``F``), anything else clipped to
    0..255; bool as 0/255.

    Args:
        pixels: ``[H, W]`` or ``[H, W, C]`` array of any real dtype.

    Returns:
        uint8 array of the same shape (``pixels`` itself when already uint8).
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * np.uint8(255)
    values = pixels.astype(np.float64)
    top = values.max() if values.size else 0.0
    if pixels.dtype in (np.uint16, np.int16) or (
            np.issubdtype(pixels.dtype, np.integer) and pixels.dtype.itemsize > 2 and top > 255):
        values = values / 257.0
    elif np.issubdtype(pixels.dtype, np.floating) and top <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
