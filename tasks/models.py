"""Checkpoints for stages: a `model` section's pointer resolved to one registered checkpoint, and its model.

Not a stage: the runner asks it which checkpoint a DAG's model is, and posttrain registers its child through
it. Every checkpoint a stage runs is in the registry, so a run record names it by id and a rerun finds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from model import registry
from model.ids import checkpoint_id_of_file
from model.registry import ModelSection
from storage import Registry, RegistryError, Store
from storage.checkpoints import weights_file


@dataclass(frozen=True)
class Checkpoint:
    checkpoint_id: str
    directory: str  # a local directory with its files, verified against their checksums


def base_directory(cfg: ModelSection, store: str) -> str:
    """The backend's base weights; a backend that materialises them (random weights, a hub id) does so once,
    under `<store>/base-checkpoints/<backend>/`."""
    st = Store(store)
    if not st.is_local:
        raise NotImplementedError("base checkpoints are materialised in a local store")
    cache = st.path("base-checkpoints", cfg.backend)
    os.makedirs(cache, exist_ok=True)
    return registry.get(cfg.backend).base_checkpoint(cfg, cache)


def register(directory: str, store: str, line: str, *, expected: dict[str, str] | None = None,
             **lineage: Any) -> str:
    """Register the checkpoint in `directory`, its files checked against `expected` when its writer recorded them
    (weights already registered keep their lineage and are repaired from `directory` if damaged); returns its id."""
    ckpt_id = checkpoint_id_of_file(weights_file(directory) or os.path.join(directory, "model.safetensors"))
    return Registry(store, line).register(directory, ckpt_id, expected=expected, **lineage).checkpoint_id


def resolve(cfg: ModelSection, store: str, cycle: int = 0) -> Checkpoint:
    """`cfg.checkpoint` ('base', 'promoted', a registry id or a directory) as one registered checkpoint."""
    reg = Registry(store, cfg.registry_line)
    pointer = cfg.checkpoint
    if pointer == "promoted":
        meta = reg.promoted()
        pointer = meta.checkpoint_id if meta is not None else "base"  # a fresh line starts from the base
    if pointer == "base" or os.path.isdir(pointer):
        src = base_directory(cfg, store) if pointer == "base" else pointer
        ckpt_id = register(src, store, cfg.registry_line, cycle=cycle)
    elif reg.meta(pointer) is not None:
        ckpt_id = pointer
    else:
        raise RegistryError(f"model.checkpoint {cfg.checkpoint!r}: not 'base', 'promoted', a directory, or a "
                            f"checkpoint id in registry {reg.root}")
    if reg.promoted() is None:  # a line's first checkpoint is its promoted one until a child passes the gate
        reg.promote(ckpt_id)
    return local_copy(store, cfg.registry_line, ckpt_id)


def load(cfg: ModelSection, ckpt: Checkpoint) -> Any:
    model = registry.load(cfg, ckpt.directory)
    if model.model_id != ckpt.checkpoint_id:  # the registry's copy verified its checksums: this cannot drift
        raise RegistryError(f"checkpoint {ckpt.checkpoint_id} loads as {model.model_id}")
    return model


@lru_cache(maxsize=16)
def local_copy(store: str, line: str, checkpoint_id: str) -> Checkpoint:
    """A registered checkpoint in a local directory, its checksums verified once per process."""
    return Checkpoint(checkpoint_id, Registry(store, line).local_dir(checkpoint_id))


@dataclass(frozen=True)
class Loader:
    """Loads a registered checkpoint's model in whichever process calls it: a Dask worker gets the loader, not the
    model, resolves its own local copy from the store and keeps the model resident."""

    section: ModelSection  # its checkpoint is a registered id
    store: str

    def __call__(self) -> Any:
        return load(self.section, local_copy(self.store, self.section.registry_line, self.section.checkpoint))
