"""Janus-Pro (transformers' JanusForConditionalGeneration) as a registered backend.

Its base checkpoint is a local directory with model.safetensors in one file (as the registry wants): the
configured directory itself, or one materialised once in the cache folder the pipeline gives, from random
weights of the configured shapes or from a hub id / sharded checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from model.registry import Backend, ModelSection, check_settings, register, save_atomically

WEIGHTS = "model.safetensors"


class JanusSection(ModelSection):
    """`model:` of a Janus recipe."""

    backend: Literal["janus"] = "janus"
    path: str | None = Field(None, description="hub id or local directory of the base checkpoint")
    random_weights: bool = Field(False, description="random weights of the configured shapes (no download)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    janus_config: dict = Field(default_factory=dict, description="JanusConfig fields for random weights")
    settings: dict = Field(default_factory=dict, description="how the backend runs: batches, token budgets, "
                           "sampler (model/janus/umm.py Settings); not part of the weights")

    @field_validator("settings")
    @classmethod
    def _check_settings(cls, v: dict) -> dict:
        from model.janus.umm import Settings  # the backend's own schema (imported only for its recipes)

        return check_settings(v, Settings)


def _load(cfg: JanusSection, directory: str, device: str):
    from model.janus.umm import JanusUMM

    return JanusUMM.from_pretrained(directory, device=device, dtype=cfg.dtype, settings=cfg.settings)


def _check_base(cfg: JanusSection) -> None:
    if not cfg.random_weights and not cfg.path:
        raise ValueError("model.backend 'janus' needs model.path (hub id or local directory) or "
                         "model.random_weights: true")


def _base(cfg: JanusSection, cache_dir: str) -> str:
    from model.janus.umm import JanusUMM

    _check_base(cfg)
    if not cfg.random_weights:
        if os.path.isdir(cfg.path) and os.path.isfile(os.path.join(cfg.path, WEIGHTS)):
            return cfg.path
    if cfg.random_weights:
        key = hashlib.sha256(json.dumps({"config": cfg.janus_config, "dtype": cfg.dtype}, sort_keys=True)
                             .encode()).hexdigest()[:12]
        name = f"random-{key}"
    else:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.path.strip("/"))[-80:]
    d = Path(cache_dir) / name
    if not (d / WEIGHTS).is_file():
        dt = "float32" if cfg.dtype == "auto" else cfg.dtype
        if cfg.random_weights:
            umm = JanusUMM.random(cfg.janus_config, device="cpu", dtype=dt, settings=cfg.settings)
        else:
            umm = JanusUMM.from_pretrained(cfg.path, device="cpu", dtype=dt, settings=cfg.settings)
        save_atomically(d, umm.save_pretrained)
    return str(d)


def _owns(directory: str) -> bool:
    from model.janus.umm import is_janus_dir

    return is_janus_dir(directory)


def _load_trainable(directory: str, device: str, dtype: str):
    from model.janus.umm import JanusUMM

    return JanusUMM.from_pretrained(directory, device=device, dtype=dtype)


register(Backend(name="janus", config=JanusSection, load=_load, base_checkpoint=_base, owns=_owns,
                 load_trainable=_load_trainable, check_base=_check_base))
