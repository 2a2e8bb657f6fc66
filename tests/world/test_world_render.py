"""The renderer: deterministic, flat palette colours, sizes, non-overlapping objects."""

import random

import numpy as np
import pytest

from model.world import (BACKGROUND_RGB, CATEGORIES, COLOR_RGB, Obj, Scene, parse, render, sample_prompt, sample_scene,
                         verify)
from model.world.scene import mask, object_px

PALETTE = set(COLOR_RGB.values()) | set(BACKGROUND_RGB.values())


def _scenes(n, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        text = sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng)
        yield text, sample_scene(parse(text).spec, rng)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_is_deterministic_rgb_and_flat(size):
    for _, scene in _scenes(40):
        img = render(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        assert np.array_equal(np.asarray(img), np.asarray(render(scene, size)))
        colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
        assert colours <= PALETTE  # no anti-aliasing: only palette colours appear


def test_objects_never_overlap_and_are_drawn_whole():
    for _, scene in _scenes(300, seed=1):
        img = np.asarray(render(scene))
        for obj in scene.objects:  # each object's own pixels survive the others' painting
            w, h = object_px(obj)
            m = mask(obj.letter or obj.shape, w, h)
            x0, y0 = round(obj.cx) - w // 2, round(obj.cy) - h // 2
            assert 0 <= x0 and x0 + w <= 32 and 0 <= y0 and y0 + h <= 32
            assert (img[y0:y0 + h, x0:x0 + w][m] == COLOR_RGB[obj.color]).all()


def test_objects_are_big_enough_for_4x4_patches_and_sizes_differ():
    large, small = (Obj("square", "red", s, 16, 16) for s in ("large", "small"))
    assert object_px(large) == (13, 13) and object_px(small) == (7, 7)
    assert object_px(large, 64) == (26, 26)
    letter = Obj("letter", "red", "large", 16, 16, "h")
    assert object_px(letter) == (10, 10)


def test_64_renders_verify_like_32_renders():
    for text, scene in _scenes(60, seed=2):
        assert verify(text, render(scene, 64)).ok, text


def test_render_clips_objects_at_the_edge():
    img = render(Scene((Obj("circle", "blue", "large", 0, 31),), "black"))
    assert img.size == (32, 32)
    assert (np.asarray(img) == COLOR_RGB["blue"]).all(-1).sum() > 20
