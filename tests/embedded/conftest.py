import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests decode on one thread (steadier on a shared 2-core box); other tests keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_model():
    """The shipped base checkpoint, loaded once."""
    from model.embedded import load_embedded
    return load_embedded()


@pytest.fixture(scope="session")
def world_batch():
    """20 prompts (2 per category) with a true and a minimally wrong (perturbed) render each."""
    import random

    from model.world import CATEGORIES, parse, perturb, render, sample_prompt, sample_scene
    rng = random.Random(1234)
    prompts = [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(20)]
    specs = [parse(p).spec for p in prompts]
    true = [render(sample_scene(s, rng)) for s in specs]
    wrong = [render(sample_scene(perturb(s, rng), rng)) for s in specs]
    return prompts, true, wrong
