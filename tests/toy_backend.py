"""A test-only backend, registered from the test suite (SELFPLAY_BACKENDS=tests.toy_backend), with nothing in
tasks/ or flows/ naming it: the embedded network under another name, with its own checkpoint format
(model_type 'toy-umm'), its own base checkpoint (the embedded base with seeded noise on its weights, so its id
differs) and a typed knob of its own that changes how it draws."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from model.embedded.umm import BASE_DIR, EmbeddedUMM
from model.registry import Backend, ModelSection, register

MODEL_TYPE = "toy-umm"


class ToySection(ModelSection):
    backend: Literal["toy"] = "toy"
    temperature_scale: float = Field(1.0, gt=0, le=4, description="multiplies every sampling temperature")
    base_noise: float = Field(0.01, ge=0, description="relative noise on the embedded base's weights")


class ToyUMM(EmbeddedUMM):
    temperature_scale = 1.0

    def config_json(self) -> dict:
        return {**super().config_json(), "model_type": MODEL_TYPE}

    def generate(self, prompts, seeds, cfg_scales, temperature=1.0, top_k=None):
        return super().generate(prompts, seeds, cfg_scales, temperature * self.temperature_scale, top_k)


def _load(cfg: ToySection, directory: str, device: str) -> ToyUMM:
    m = ToyUMM.from_pretrained(directory, device=device)
    m.temperature_scale = cfg.temperature_scale
    return m


def _base(cfg: ToySection, cache_dir: str) -> str:
    d = Path(cache_dir) / f"noise-{cfg.base_noise:g}"
    if not (d / "model.safetensors").is_file():
        m = ToyUMM.from_pretrained(BASE_DIR)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.net.parameters():
                p.add_(cfg.base_noise * p.std() * torch.randn(p.shape, generator=g))
        m.weights_changed()
        m.save_pretrained(d)
    return str(d)


def _owns(directory: str) -> bool:
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


register(Backend(name="toy", config=ToySection, load=_load, base_checkpoint=_base, owns=_owns,
                 load_trainable=lambda d, device, dtype: ToyUMM.from_pretrained(d, device=device)))
