import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary database and server) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


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


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_VLM = "tiny-qwen2-vl"  # the served name of the test VLM


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random-weight Qwen2-VL (real architecture, toy sizes) built locally in vLLM's environment."""
    from model.vlm.server import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("vlm") / TINY_VLM)


@pytest.fixture(scope="session")
def vlm_server(tiny_vlm_dir):
    """A real `vllm serve` engine (vLLM's CPU build) on 127.0.0.1, serving the tiny VLM for the session."""
    from model.vlm.server import VLLMServer

    server = VLLMServer(tiny_vlm_dir, served_name=TINY_VLM)
    server.start()
    yield server
    server.stop()
