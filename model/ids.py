"""The checkpoint id: the one place it is computed.

A checkpoint is named by its weights: the first 16 hex digits of the sha256 of its safetensors file
(model.safetensors). Backends name themselves with it (`model_id`) and the registry names what it stores with it,
so a model loaded from a registered checkpoint carries the id it was registered under.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ID_HEX_DIGITS = 16


def checkpoint_id(data: bytes) -> str:
    """The id of a checkpoint whose safetensors weights are `data`."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX_DIGITS]


def checkpoint_id_of_file(path: str | Path) -> str:
    """The id of the safetensors weights file at `path` (read in chunks: a real checkpoint is many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:ID_HEX_DIGITS]
