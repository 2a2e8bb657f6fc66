import pytest
import yaml

from configs.schema import PROJECT_ROOT

RECIPE = PROJECT_ROOT / "configs/cycle/janus-tiny-random.yaml"


@pytest.fixture(scope="session")
def tiny_recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


@pytest.fixture(scope="session")
def tiny(tiny_recipe):
    """The tiny random Janus (real architecture, toy sizes) in fp32 on CPU."""
    import torch

    from model.janus import JanusUMM

    torch.set_num_threads(1)
    m = tiny_recipe["model"]
    return JanusUMM.random(m["janus_config"], device="cpu", dtype="float32", settings=m["settings"])
