"""Same (checkpoint, prompt, seed, sampling params) -> same image, whatever else is in the batch."""

import numpy as np


def _same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_image_any_batch(base_model, world_batch):
    prompts = world_batch[0][:6]
    a = base_model.generate(prompts, [11, 12, 13, 14, 15, 16], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    b = base_model.generate(prompts, [11, 12, 13, 14, 15, 16], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert all(_same(x, y) for x, y in zip(a, b))
    # the same (prompt, seed, cfg) inside a different batch (other prompts, other order, other size)
    c = base_model.generate([prompts[3], "a red circle", prompts[0]], [14, 99, 11], [6.0, 3.0, 3.0])
    assert _same(c[0], a[3]) and _same(c[2], a[0])


def test_different_seeds_differ(base_model, world_batch):
    p = world_batch[0][9]
    imgs = base_model.generate([p] * 6, list(range(6)), [3.0] * 6, temperature=1.0)
    distinct = {np.asarray(i).tobytes() for i in imgs}
    assert len(distinct) >= 4
