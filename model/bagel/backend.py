"""BAGEL (UniCorn's base model) as a registered backend: the official checkpoint layout, flow-matching sampling.

Its base checkpoint is a directory in the official layout (llm_config.json, vit_config.json, ema.safetensors,
ae.safetensors, the Qwen2 tokenizer files): `model.path` as it is, or one materialised once in the cache folder
the pipeline gives, from random weights of the configured shape (`model.shape`: `tiny` for CPU tests, `7b-mot`
for BAGEL-7B-MoT) with a locally built tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from model.registry import Backend, ModelSection, check_settings, register, save_atomically


class BagelSection(ModelSection):
    """`model:` of a BAGEL recipe."""

    backend: Literal["bagel"] = "bagel"
    path: str | None = Field(None, description="a local directory in the official BAGEL layout")
    random_weights: bool = Field(False, description="random weights of `shape` (no download)")
    shape: Literal["tiny", "7b-mot"] = Field("tiny", description="random weights: the network's shape")
    vae: Literal["tiny", "flux"] = Field("tiny", description="random weights: the autoencoder's shape")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    settings: dict = Field(default_factory=dict, description="how the backend runs (model/bagel/umm.py Settings)")

    @field_validator("settings")
    @classmethod
    def _check_settings(cls, v: dict) -> dict:
        from model.bagel.umm import Settings  # the backend's own schema (imported only for its recipes)

        return check_settings(v, Settings)


def _shape(cfg: BagelSection):
    from model.bagel.config import BAGEL_7B_MOT, TINY
    from model.bagel.vae import FLUX_VAE_CONFIG, TINY_VAE_CONFIG

    return {"tiny": TINY, "7b-mot": BAGEL_7B_MOT}[cfg.shape], {"tiny": TINY_VAE_CONFIG, "flux": FLUX_VAE_CONFIG}[cfg.vae]


def _load(cfg: BagelSection, directory: str, device: str):
    from model.bagel.umm import BagelUMM

    return BagelUMM.from_pretrained(directory, device=device, dtype=cfg.dtype, settings=cfg.settings)


def _check_base(cfg: BagelSection) -> None:
    from model.bagel.umm import is_bagel_dir

    if not cfg.random_weights and (not cfg.path or not is_bagel_dir(cfg.path)):
        raise ValueError(f"model.path {cfg.path!r}: model.backend 'bagel' needs a directory in the official BAGEL "
                         "layout (llm_config.json, ema.safetensors, ...) or model.random_weights: true")


def _base(cfg: BagelSection, cache_dir: str) -> str:
    from model.bagel.umm import BagelUMM, is_bagel_dir
    from model.vlm.tiny import tiny_qwen2_tokenizer

    _check_base(cfg)
    if not cfg.random_weights:
        return cfg.path
    key = hashlib.sha256(json.dumps({"shape": cfg.shape, "vae": cfg.vae, "dtype": cfg.dtype,
                                     "settings": cfg.settings}, sort_keys=True).encode()).hexdigest()[:12]
    d = Path(cache_dir) / f"random-{key}"
    if not is_bagel_dir(str(d)):
        net_cfg, vae_cfg = _shape(cfg)
        umm = BagelUMM.random(net_cfg, vae_cfg, tiny_qwen2_tokenizer(), device="cpu",
                              dtype="float32" if cfg.dtype == "auto" else cfg.dtype, settings=cfg.settings)
        save_atomically(d, umm.save_pretrained)
    return str(d)


def _owns(directory: str) -> bool:
    from model.bagel.umm import is_bagel_dir

    return is_bagel_dir(directory)


def _load_trainable(directory: str, device: str, dtype: str):
    from model.bagel.umm import BagelUMM

    return BagelUMM.from_pretrained(directory, device=device, dtype=dtype)


def _sampling():
    from model.bagel.sampler import FlowSampling

    return FlowSampling


register(Backend(name="bagel", config=BagelSection, load=_load, base_checkpoint=_base, owns=_owns,
                 load_trainable=_load_trainable, sampling=_sampling(), check_base=_check_base))
