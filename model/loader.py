"""Resolve a model config to a loaded backend: the one place that knows where checkpoints live.

`checkpoint` is 'base' (the shipped embedded checkpoint), 'promoted' (the registry line's pointer), a registry
checkpoint id, or a local directory written by `save_pretrained`. Loaded models are cached per process.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from configs.schema import ModelConfig
from storage import Registry


def resolve_checkpoint_dir(cfg: ModelConfig, store: str) -> str | None:
    """A local directory of weights, or None for the backend's shipped base checkpoint."""
    if cfg.checkpoint == "base":
        if cfg.backend == "janus":  # a real UMM's base: a local directory, materialised once if need be
            from model.janus import base_dir

            return base_dir(cfg, store)
        return None
    reg = Registry(store, cfg.registry_line)
    if cfg.checkpoint == "promoted":
        meta = reg.promoted()
        return reg.local_dir(meta.checkpoint_id) if meta is not None else None
    if os.path.isdir(cfg.checkpoint):
        return cfg.checkpoint
    if reg.meta(cfg.checkpoint) is not None:
        return reg.local_dir(cfg.checkpoint)
    raise FileNotFoundError(f"model.checkpoint {cfg.checkpoint!r}: not 'base', 'promoted', a directory, "
                            f"or a checkpoint id in registry {reg.root}")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def _load(backend: str, directory: str | None, device: str, dtype: str = "auto", settings: str = "{}") -> Any:
    if backend == "embedded":
        from model.embedded.umm import EmbeddedUMM

        return EmbeddedUMM.from_pretrained(directory, device=device)
    if backend == "janus":
        from model.janus import JanusUMM

        return JanusUMM.from_pretrained(directory, device=device, dtype=dtype, settings=json.loads(settings))
    raise NotImplementedError(f"model.backend {backend!r} is not available in this build")


def load_model(cfg: ModelConfig, store: str) -> Any:
    # dtype and backend settings (as canonical JSON: the cache key must be hashable) matter to janus only
    return _load(cfg.backend, resolve_checkpoint_dir(cfg, store), _device(cfg.device), cfg.dtype,
                 json.dumps(cfg.sampling, sort_keys=True))


def load_directory(directory: str, device: str = "cpu", dtype: str = "auto") -> Any:
    """A checkpoint directory written by any backend's `save_pretrained`, its backend read from its files
    (uncached: for a training process that owns the model)."""
    from model.janus import is_janus_dir

    if is_janus_dir(directory):
        from model.janus import JanusUMM

        return JanusUMM.from_pretrained(directory, device=device, dtype=dtype)
    from model.embedded.umm import EmbeddedUMM

    return EmbeddedUMM.from_pretrained(directory, device=device)
