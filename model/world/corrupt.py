"""Image corruptions the oracle must survive: what a lossy tokenizer or a small generator does to a render.
Edge errors are one-sided (right/bottom rim), i.e. an edge off by one pixel; see the oracle's template variants."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise(img: Image.Image, rng: np.random.Generator, amp: int = 20) -> Image.Image:
    """Independent uniform noise in [-amp, amp] per pixel and channel."""
    a = np.asarray(img).astype(np.int16) + rng.integers(-amp, amp + 1, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def gaussian(img: Image.Image, rng: np.random.Generator, sigma: float = 10.0) -> Image.Image:
    a = np.asarray(img).astype(np.float32) + rng.normal(0, sigma, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def edge_noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour noise plus a 1-px erosion or dilation, at random: what world_check reads as a "noisy" render."""
    return noise(erode(img) if rng.random() < 0.5 else dilate(img), rng, 20)


def _fg(a: np.ndarray) -> np.ndarray:
    return np.any(a != a[0, 0], axis=-1)  # renders keep the corner pixel as background


def erode(img: Image.Image, two_sided: bool = False) -> Image.Image:
    """Remove a 1-px rim from each object's right and bottom edges (all four edges when two_sided)."""
    a = np.asarray(img).copy()
    fg = _fg(a)
    keep = fg.copy()
    keep[:, :-1] &= fg[:, 1:]
    keep[:-1] &= fg[1:]
    if two_sided:
        keep[:, 1:] &= fg[:, :-1]
        keep[1:] &= fg[:-1]
    a[fg & ~keep] = a[0, 0]
    return Image.fromarray(a)


def dilate(img: Image.Image) -> Image.Image:
    """Grow each object by 1 px to the right and bottom, copying its colour."""
    a = np.asarray(img).copy()
    fg = _fg(np.asarray(img))
    src = np.asarray(img)
    right = np.zeros_like(fg)
    right[:, 1:] = fg[:, :-1] & ~fg[:, 1:]
    a[right] = src[:, :-1][right[:, 1:]]
    fg2 = _fg(a)
    down = np.zeros_like(fg)
    down[1:] = fg2[:-1] & ~fg2[1:]
    a[down] = a[:-1][down[1:]]
    return Image.fromarray(a)
