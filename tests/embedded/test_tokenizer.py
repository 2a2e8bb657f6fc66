"""The image tokenizer: world images survive encode -> decode (the oracle's verdicts stay right)."""

import random

import numpy as np
from PIL import Image

from model.embedded.tokenizer import PatchCodebook, Vocab
from model.world import CATEGORIES, parse, render, sample_prompt, sample_scene, verify


def _world_images(n, seed):
    rng = random.Random(seed)
    ps = [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(n)]
    return ps, [render(sample_scene(parse(p).spec, rng)) for p in ps]


def test_round_trip_keeps_the_oracle_right(base_model):
    cb = base_model.codebook
    prompts, imgs = _world_images(1000, seed=99)
    codes = cb.encode(imgs)
    assert codes.shape == (1000, 65) and codes.min() >= 0 and codes.max() < cb.k
    back = cb.decode(codes)
    ok = np.mean([verify(p, im).ok for p, im in zip(prompts, back)])
    assert ok >= 0.995, f"oracle pass after round trip {ok:.4f}"
    exact = np.mean([np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, back)])
    assert exact >= 0.99, f"pixel-exact round trips {exact:.4f}"


def test_codes_are_image_tokens_and_decode_is_total(base_model):
    cb = base_model.codebook
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    big = noise.resize((64, 64))
    codes = cb.encode([noise, big])
    assert codes[:, 0].max() < cb.n_backgrounds  # first token: the background
    assert (codes[:, 1:] >= cb.n_backgrounds).all()
    # any id sequence decodes to a 32x32 RGB image, even ids out of place
    rnd = np.random.default_rng(1).integers(0, cb.k, (3, 65))
    for im in cb.decode(rnd):
        assert im.size == (32, 32) and im.mode == "RGB"


def test_fit_learns_exact_masks_from_images():
    _, imgs = _world_images(200, seed=5)
    from model.embedded.data import world_palette
    cb = PatchCodebook.fit(imgs, *world_palette(), n_masks=256)
    assert (cb.masks[0] == 0).all() and cb.n_masks <= 256
    back = cb.decode(cb.encode(imgs))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, back))
    small = PatchCodebook.fit(imgs, *world_palette(), n_masks=4)
    assert small.k == small.n_backgrounds + 1 + 3 * small.n_colors


def test_vocab_round_trip():
    v = Vocab(["a", "red", "circle", "yes", "no"], ["single_object"], n_codes=10)
    ids = v.text_ids(["a", "red", "circle", "zebra"])
    assert ids[-1] == v.UNK
    assert v.words_of(ids[:3] + [v.EOS, ids[0]]) == ["a", "red", "circle"]
    assert Vocab.from_json(v.to_json()).itos == v.itos
    assert v.size == v.text_size + 10
