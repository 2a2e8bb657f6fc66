"""The checkpoint registry: safetensors weights + config + metadata with lineage, and a promoted pointer.

    <store>/checkpoints/<line>/<checkpoint_id>/model.safetensors, config.json, ...   (the model's own files)
                                              _meta.json   parent, cycle, data fingerprint, metrics, checksums
                        <line>/promoted.json  {"checkpoint_id": ...}, switched by one atomic write

A checkpoint is registered by copying a directory that a backend's `save_pretrained` wrote; the
registry never unpickles anything: it refuses directories with pickle files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from storage.names import validate_name
from storage.store import Store

WEIGHTS = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointMeta(BaseModel):
    checkpoint_id: str
    parent: str | None = None
    cycle: int = 0
    data_fingerprint: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256
    created_at: str = ""


class RegistryError(RuntimeError):
    pass


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Registry:
    def __init__(self, store: str | Store = Store(), line: str = "default"):
        self.store = store if isinstance(store, Store) else Store(store)
        self.line = validate_name(line, "registry line")
        self.root = self.store.path("checkpoints", self.line)

    def _dir(self, checkpoint_id: str) -> str:
        return f"{self.root}/{validate_name(checkpoint_id, 'checkpoint id')}"

    def register(self, src_dir: str, checkpoint_id: str, *, parent: str | None = None, cycle: int = 0,
                 data_fingerprint: str | None = None, config: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None) -> CheckpointMeta:
        names = sorted(n for n in os.listdir(src_dir) if os.path.isfile(os.path.join(src_dir, n)))
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise RegistryError(f"{src_dir}: refusing pickle files {pickled}; save weights as safetensors")
        if not os.path.isfile(os.path.join(src_dir, WEIGHTS)):
            raise RegistryError(f"{src_dir}: no {WEIGHTS} (weights must be safetensors)")
        ckpt_id = validate_name(checkpoint_id, "checkpoint id")  # the model's own id of these weights
        existing = self.meta(ckpt_id)
        if existing is not None:  # same weights already registered: keep the first lineage, hash nothing again
            return existing
        meta = CheckpointMeta(
            checkpoint_id=ckpt_id, parent=parent, cycle=cycle, data_fingerprint=data_fingerprint,
            config=config or {}, metrics=metrics or {},
            files={n: _sha256_file(os.path.join(src_dir, n)) for n in names if not n.startswith("_")},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        dest = self._dir(ckpt_id)
        for n in meta.files:
            with open(os.path.join(src_dir, n), "rb") as fh:
                self.store.atomic_write(f"{dest}/{n}", fh.read())
        self.store.atomic_write(f"{dest}/_meta.json", meta.model_dump_json(indent=1).encode())  # last: commit
        return meta

    def meta(self, checkpoint_id: str) -> CheckpointMeta | None:
        try:
            return CheckpointMeta.model_validate_json(self.store.read_bytes(f"{self._dir(checkpoint_id)}/_meta.json"))
        except FileNotFoundError:
            return None

    def update_metrics(self, checkpoint_id: str, metrics: dict[str, Any]) -> CheckpointMeta:
        meta = self.require(checkpoint_id)
        meta.metrics.update(metrics)
        self.store.atomic_write(f"{self._dir(checkpoint_id)}/_meta.json", meta.model_dump_json(indent=1).encode())
        return meta

    def require(self, checkpoint_id: str) -> CheckpointMeta:
        meta = self.meta(checkpoint_id)
        if meta is None:
            raise RegistryError(f"no checkpoint {checkpoint_id!r} in registry {self.root}")
        return meta

    def list(self) -> list[CheckpointMeta]:
        if not self.store.exists(self.root):
            return []
        out = []
        for entry in self.store.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != "promoted.json" and (m := self.meta(name)) is not None:
                out.append(m)
        return sorted(out, key=lambda m: (m.cycle, m.created_at))

    def local_dir(self, checkpoint_id: str) -> str:
        """A local directory holding the checkpoint's files, verified against their checksums."""
        meta = self.require(checkpoint_id)
        src = self._dir(checkpoint_id)
        local = src if self.store.is_local else tempfile.mkdtemp(prefix=f"ckpt-{checkpoint_id}-")
        for n, sha in meta.files.items():
            if not self.store.is_local:
                self.store.fs.get_file(f"{src}/{n}", os.path.join(local, n))
            if _sha256_file(os.path.join(local, n)) != sha:
                if not self.store.is_local:
                    shutil.rmtree(local, ignore_errors=True)
                raise RegistryError(f"checkpoint {checkpoint_id}: {n} does not match its checksum")
        return local

    # --- promotion --------------------------------------------------------------------------------
    def promote(self, checkpoint_id: str) -> None:
        self.require(checkpoint_id)
        self.store.atomic_write(f"{self.root}/promoted.json",
                                json.dumps({"checkpoint_id": checkpoint_id}).encode())

    def promoted(self) -> CheckpointMeta | None:
        try:
            ckpt = json.loads(self.store.read_bytes(f"{self.root}/promoted.json"))["checkpoint_id"]
        except FileNotFoundError:
            return None
        return self.require(ckpt)

    def lineage(self, checkpoint_id: str) -> list[CheckpointMeta]:
        chain, seen = [], set()
        cur: str | None = checkpoint_id
        while cur is not None and cur not in seen:
            seen.add(cur)
            meta = self.require(cur)
            chain.append(meta)
            cur = meta.parent
        return chain
