"""Backends behind one registry: a name -> its typed `model` config section, loader, base checkpoint, CLI extras.

A backend registers itself (`register(Backend(...))`, as torchtitan's models register their builders); the
built-in ones are imported on first use. The pipeline never names a backend: the cycle config's `model`
section is validated by the registered backend's config class, and stages load models through here. A
backend added from outside (a test, a plugin) needs no edit to tasks/ or flows/.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from configs.loader import Strict
from model.protocol import TokenSampling

# imported on first use, so `selfplay --help` and config validation stay fast
BUILTIN = {"embedded": "model.embedded.backend", "janus": "model.janus.backend", "bagel": "model.bagel.backend"}
# modules that register more backends (comma-separated), imported on first lookup in every process that
# looks one up, the post-training workers included: a backend outside this package needs no edit here
PLUGINS_ENV = "SELFPLAY_BACKENDS"


class ModelSection(Strict):
    """What every backend's `model` section has; a backend's own section subclasses it."""

    backend: str
    checkpoint: str = Field("base", description="'base' (the backend's), 'promoted', a registry id or a directory")
    registry_line: str = Field("default", description="the checkpoint registry line (lineage + promoted pointer)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("checkpoint")
    @classmethod
    def _directory(cls, v: str) -> str:
        # a directory is resolved once, here, so every process (a worker elsewhere) means the same one
        path = os.path.expanduser(v)
        return os.path.realpath(path) if v not in ("base", "promoted") and os.path.isdir(path) else v


@dataclass(frozen=True)
class Backend:
    name: str
    config: type[ModelSection]
    # (section, checkpoint directory, device) -> a model with the inference roles (and the training protocol)
    load: Callable[[Any, str, str], Any]
    # (section, a local folder it may write to) -> the directory of the backend's base weights
    base_checkpoint: Callable[[Any, str], str]
    # is this checkpoint directory one of this backend's?
    owns: Callable[[str], bool]
    # (directory, device, dtype) -> a trainable model read from a checkpoint's own files (post-training)
    load_trainable: Callable[[str, str, str], Any]
    # a rubric check at config time (the judge's rubric belongs to the backend's world), or None
    check_rubric: Callable[[dict], None] | None = None
    # adds the backend's own commands to the CLI (a typer app), or None
    cli: Callable[[Any], None] | None = None
    # the typed sampling parameters its generate and reflect take as keywords (rollout.sampling, benchmark.sampling)
    sampling: type[Strict] = TokenSampling
    # (section) -> raises ValueError when the section's base weights cannot be had, checked before any work
    # (preflight), or None
    check_base: Callable[[Any], None] | None = None


_BACKENDS: dict[str, Backend] = {}


class UnknownBackendError(ValueError):
    pass


def save_atomically(directory: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """`save(folder)` into a sibling temporary folder, then moved into place: a base checkpoint materialised by a
    backend is whole or absent, never half-written."""
    import shutil

    tmp = f"{os.fspath(directory)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def _import_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


def names() -> list[str]:
    _import_plugins()
    return sorted(set(_BACKENDS) | set(BUILTIN))


def get(name: str) -> Backend:
    _import_plugins()
    if name not in _BACKENDS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r} (registered: {', '.join(names())})")
    return _BACKENDS[name]


def all_backends() -> list[Backend]:
    return [get(n) for n in names()]


def section(data: Any) -> ModelSection:
    """A cycle config's `model` section, validated by its backend's own config class."""
    if isinstance(data, ModelSection):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping with a 'backend' key, got {type(data).__name__}")
    return get(data.get("backend", "embedded")).config.model_validate({"backend": "embedded", **data})


def for_directory(directory: str) -> Backend:
    """The backend whose checkpoint files these are."""
    for b in all_backends():
        if b.owns(directory):
            return b
    raise UnknownBackendError(f"{directory}: no registered backend ({', '.join(names())}) recognises this "
                              "checkpoint directory")


def device_of(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any, device: str) -> Any:
    """A model's torch dtype from its config: 'auto' is bf16 on a GPU, fp32 on a CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_settings(settings: dict, schema: Any) -> dict:
    """A backend's `model.settings` checked against its Settings schema when the recipe loads: a bad value is one
    line before any stage runs, not an error when the model is loaded mid-run."""
    from pydantic import ValidationError

    try:
        schema.model_validate(settings)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    return settings


def to_device(data: Any, device: Any, dtype: Any = None) -> Any:
    """A host tensor (or list) on `device` without a stream sync: a copy from pageable memory waits for every
    kernel queued before it, so the host could never run ahead of the GPU; through pinned memory it is queued like
    a kernel (the host allocator keeps the pinned block until the copy has run)."""
    import torch

    t = data if torch.is_tensor(data) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Models stay resident per process, keyed by checkpoint directory and section: a worker loads a stage's model once
# per checkpoint and keeps it for every shard it gets. SELFPLAY_RESIDENT_MODELS bounds how many stay (the oldest
# goes first): a Dask worker keeps one, so a new checkpoint releases the last one's memory.
RESIDENT_ENV = "SELFPLAY_RESIDENT_MODELS"
_RESIDENT: dict[tuple[str, str, str, str], Any] = {}


def load(cfg: ModelSection, directory: str) -> Any:
    """The model in `directory` for this section, resident in this process."""
    # the checkpoint pointer is not part of the key: the directory is
    key = (cfg.backend, directory, device_of(cfg.device), cfg.model_copy(update={"checkpoint": "base"}).model_dump_json())
    if key not in _RESIDENT:
        limit = max(1, int(os.environ.get(RESIDENT_ENV, "4")))
        while len(_RESIDENT) >= limit:
            _RESIDENT.pop(next(iter(_RESIDENT)))
            _free_accelerator()
        b = get(cfg.backend)
        _RESIDENT[key] = b.load(cfg, directory, key[2])
    return _RESIDENT[key]


def release_resident() -> int:
    """Drop every resident model of this process (before a job that needs the accelerator's whole memory)."""
    n = len(_RESIDENT)
    _RESIDENT.clear()
    _free_accelerator()
    return n


def _free_accelerator() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_trainable(directory: str, device: str = "cpu", dtype: str = "auto") -> Any:
    """A checkpoint directory of any registered backend, uncached (a training process owns its model)."""
    return for_directory(directory).load_trainable(directory, device, dtype)
