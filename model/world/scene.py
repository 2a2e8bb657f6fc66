"""Scenes and the deterministic renderer: flat fills, no anti-aliasing, one cached mask per (kind, w, h)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from .vocab import BACKGROUND_RGB, COLOR_RGB, FRAME, GLYPHS, LETTER_SCALE, SIZE_PX


@dataclass(frozen=True)
class Obj:
    """One object: a shape (SHAPES) or a letter glyph (shape "letter", `letter` set); centre (cx, cy) in the 32 px
    frame. Detected objects may also be a "blob" (no recognisable shape) or of "mixed" colour: they match nothing."""

    shape: str
    color: str
    size: str  # "small" / "large"; letters are always "large"
    cx: float
    cy: float
    letter: str | None = None


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    background: str = "white"


@lru_cache(maxsize=4096)
def mask(kind: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of a shape or a letter filling a w x h box; pixel centres decide (no anti-aliasing)."""
    if kind in GLYPHS:  # nearest-neighbour scaling of the 5x5 bitmap
        glyph = np.array([[c == "#" for c in row] for row in GLYPHS[kind]])
        m = glyph[(np.arange(h) * 5) // h][:, (np.arange(w) * 5) // w]
        m.setflags(write=False)
        return m
    y, x = np.mgrid[0:h, 0:w] + 0.5
    dx, dy = (x - w / 2) / (w / 2), (y - h / 2) / (h / 2)  # in [-1, 1]
    if kind == "circle":
        m = dx**2 + dy**2 <= 1.0
    elif kind == "square":
        m = np.ones((h, w), bool)
    elif kind == "triangle":  # apex up: the half-width grows linearly with the row
        m = np.abs(dx) <= (dy + 1) / 2 + 1e-9
    elif kind == "diamond":
        m = np.abs(dx) + np.abs(dy) <= 1.0 + 1e-9
    else:
        raise ValueError(f"unknown shape {kind!r}")
    m.setflags(write=False)
    return m


def object_px(obj: Obj, size: int = FRAME) -> tuple[int, int]:
    """Pixel width/height of an object on a canvas of `size`."""
    if obj.shape == "letter":
        return (5 * round(LETTER_SCALE * size / FRAME),) * 2
    side = round(SIZE_PX[obj.size] * size / FRAME)
    return side, side


def render(scene: Scene, size: int = FRAME) -> Image.Image:
    """RGB image of the scene; the same scene always gives the same pixels. Later objects paint over earlier."""
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND_RGB.get(scene.background, BACKGROUND_RGB["white"])
    scale = size / FRAME
    for obj in scene.objects:
        w, h = object_px(obj, size)
        m = mask(obj.letter if obj.shape == "letter" else obj.shape, w, h)
        x0, y0 = round(obj.cx * scale) - w // 2, round(obj.cy * scale) - h // 2
        # Clip to the canvas so a hand-made scene near the edge still renders.
        xs, ys = slice(max(x0, 0), min(x0 + w, size)), slice(max(y0, 0), min(y0 + h, size))
        sub = m[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        canvas[ys, xs][sub] = COLOR_RGB[obj.color]
    return Image.fromarray(canvas, "RGB")
