"""The checkpoint registry: safetensors weights + config + metadata with lineage, and a promoted pointer.

    <store>/checkpoints/<line>/<checkpoint_id>/model.safetensors, config.json, ...   (the model's own files)
                                              _meta.json   parent, cycle, data fingerprint, metrics, checksums
                        <line>/promoted.json  {"checkpoint_id": ...}, switched by one atomic write

A checkpoint is registered by copying a directory that a backend's `save_pretrained` wrote; the
registry never unpickles anything: it refuses directories with pickle files. Its files are checked against
their checksums wherever they are used, promoted or re-registered: a rerun that registers the same weights
repairs a damaged copy from its source. A writer that hands a directory on (the trainer's `final/`) records
its own checksums in `_checksums.json`, so damage between writing and registering is told apart too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from storage.names import validate_name
from storage.store import Store

WEIGHTS = "model.safetensors"
# the file a checkpoint is named by (its id is its hash): model.safetensors, or ema.safetensors where a backend keeps
# an official layout that names its weights so (BAGEL)
WEIGHTS_FILES = (WEIGHTS, "ema.safetensors")


def weights_file(directory: str) -> str | None:
    """The path of the weights file a checkpoint directory is named by, or None if it has none."""
    for name in WEIGHTS_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None
CHECKSUMS = "_checksums.json"  # a writer's record of the files it wrote: name -> sha256
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


def _sha256_file(path: str, fs: Any = None) -> str:
    h = hashlib.sha256()
    with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(directory: str, names: Iterable[str] | None = None, fs: Any = None) -> dict[str, str]:
    """The sha256 of each of `names` present in `directory` (default: every local file but `_checksums.json`)."""
    if names is None:
        names = [n for n in os.listdir(directory) if n != CHECKSUMS and os.path.isfile(os.path.join(directory, n))]
    out = {}
    for n in sorted(names):
        try:
            out[n] = _sha256_file(f"{directory}/{n}", fs)
        except FileNotFoundError:
            pass
    return out


def differences(actual: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Each file whose checksum in `actual` is not the one `expected` names, and why; empty when they agree."""
    return [f"{n}: " + ("missing" if n not in actual else f"not in {CHECKSUMS}" if n not in expected
                        else "does not match its checksum")
            for n in sorted(actual.keys() | expected.keys()) if actual.get(n) != expected.get(n)]


def write_checksums(directory: str) -> None:
    """Record the checksums of every file in `directory`, for whoever reuses it after its writer is gone."""
    with open(os.path.join(directory, CHECKSUMS), "w") as fh:
        json.dump(checksums(directory), fh, indent=1)


def read_checksums(directory: str) -> dict[str, str]:
    path = os.path.join(directory, CHECKSUMS)
    try:
        with open(path, "rb") as fh:
            found = json.loads(fh.read())
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing") from None
    except ValueError:
        raise RegistryError(f"{path}: unreadable") from None
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise RegistryError(f"{path}: unreadable")
    return found


class Registry:
    def __init__(self, store: str | Store = Store(), line: str = "default"):
        self.store = store if isinstance(store, Store) else Store(store)
        self.line = validate_name(line, "registry line")
        self.root = self.store.path("checkpoints", self.line)

    def _dir(self, checkpoint_id: str) -> str:
        return f"{self.root}/{validate_name(checkpoint_id, 'checkpoint id')}"

    def register(self, src_dir: str, checkpoint_id: str, *, expected: dict[str, str] | None = None,
                 parent: str | None = None, cycle: int = 0, data_fingerprint: str | None = None,
                 config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> CheckpointMeta:
        """Copy `src_dir` in as `checkpoint_id`; `expected` (its writer's checksums) refuses files changed since.
        An id already registered keeps its first lineage; its files, if damaged, are rewritten from `src_dir`."""
        names = sorted(n for n in os.listdir(src_dir) if os.path.isfile(os.path.join(src_dir, n)))
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise RegistryError(f"{src_dir}: refusing pickle files {pickled}; save weights as safetensors")
        if weights_file(src_dir) is None:
            raise RegistryError(f"{src_dir}: no {' or '.join(WEIGHTS_FILES)} (weights must be safetensors)")
        ckpt_id = validate_name(checkpoint_id, "checkpoint id")  # the model's own id of these weights
        try:
            existing = self.meta(ckpt_id)
        except RegistryError:  # its meta is unreadable: write it again as a first registration would
            existing = None
        if existing is not None:
            return self._repair(existing, src_dir)
        files = checksums(src_dir, [n for n in names if not n.startswith("_")])
        if expected is not None and (bad := differences(files, {n: s for n, s in expected.items()
                                                                 if not n.startswith("_")})):
            raise RegistryError(f"{src_dir}: refusing to register damaged files ({'; '.join(bad)})")
        meta = CheckpointMeta(
            checkpoint_id=ckpt_id, parent=parent, cycle=cycle, data_fingerprint=data_fingerprint,
            config=config or {}, metrics=metrics or {}, files=files,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        dest = self._dir(ckpt_id)
        self._copy(src_dir, dest, meta.files)
        self.store.atomic_write(f"{dest}/_meta.json", meta.model_dump_json(indent=1).encode())  # last: commit
        return meta

    def _copy(self, src_dir: str, dest: str, names: Iterable[str]) -> None:
        for n in names:
            with open(os.path.join(src_dir, n), "rb") as fh:
                self.store.atomic_write(f"{dest}/{n}", fh.read())

    def _repair(self, meta: CheckpointMeta, src_dir: str) -> CheckpointMeta:
        """Rewrite the damaged files of a registered checkpoint from a source that holds them intact."""
        current = checksums(self._dir(meta.checkpoint_id), meta.files, self.store.fs)
        damaged = {n: sha for n, sha in meta.files.items() if current.get(n) != sha}
        if not damaged:
            return meta
        if bad := differences(checksums(src_dir, damaged), damaged):
            raise RegistryError(f"checkpoint {meta.checkpoint_id} is damaged "
                                f"({'; '.join(differences(current, meta.files))}) and {src_dir} cannot repair "
                                f"it ({'; '.join(bad)}): register it from an intact copy of its files")
        self._copy(src_dir, self._dir(meta.checkpoint_id), damaged)
        return meta

    def meta(self, checkpoint_id: str) -> CheckpointMeta | None:
        path = f"{self._dir(checkpoint_id)}/_meta.json"
        try:
            return CheckpointMeta.model_validate_json(self.store.read_bytes(path))
        except FileNotFoundError:
            return None
        except ValueError:
            raise RegistryError(f"{path}: unreadable; rerun the run that registered checkpoint {checkpoint_id} "
                                "to rewrite it") from None

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

    def ids(self) -> list[str]:
        """Every checkpoint folder of the line, its meta readable or not (`verify` says which)."""
        if not self.store.exists(self.root):
            return []
        return [f.rsplit("/", 1)[-1] for f in self.store.folders(self.root)]

    def list(self) -> list[CheckpointMeta]:
        """The registered checkpoints whose meta is readable, oldest cycle first."""
        out = []
        for name in self.ids():
            try:
                m = self.meta(name)
            except RegistryError:
                continue
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: (m.cycle, m.created_at))

    def verify(self, checkpoint_id: str) -> list[str]:
        """What is damaged in a registered checkpoint: its meta, or files missing or changed; empty when intact."""
        try:
            meta = self.meta(checkpoint_id)
        except RegistryError as exc:
            return [str(exc)]
        if meta is None:
            return [f"{self._dir(checkpoint_id)}/_meta.json: missing"]
        return self._problems(meta, self._dir(checkpoint_id), self.store.fs)

    @staticmethod
    def _problems(meta: CheckpointMeta, directory: str, fs: Any = None) -> list[str]:
        return differences(checksums(directory, meta.files, fs), meta.files)

    def _damaged(self, checkpoint_id: str, problems: list[str]) -> RegistryError:
        return RegistryError(
            f"checkpoint {checkpoint_id} in {self.root} is damaged ({'; '.join(problems)}): rerun the run that "
            f"registered it to repair it from its source; `selfplay checkpoints verify --store {self.store.url} "
            f"--line {self.line}` checks the whole line")

    def local_dir(self, checkpoint_id: str) -> str:
        """A local directory holding the checkpoint's files, verified against their checksums."""
        meta = self.require(checkpoint_id)
        src = self._dir(checkpoint_id)
        if self.store.is_local:
            local, problems = src, self.verify(checkpoint_id)
        else:
            local = tempfile.mkdtemp(prefix=f"ckpt-{checkpoint_id}-")
            for n in meta.files:
                self.store.fs.get_file(f"{src}/{n}", os.path.join(local, n))
            problems = self._problems(meta, local)
        if problems:
            if local != src:
                shutil.rmtree(local, ignore_errors=True)
            raise self._damaged(checkpoint_id, problems)
        return local

    # --- promotion --------------------------------------------------------------------------------
    def promote(self, checkpoint_id: str) -> None:
        """Point the line at an intact registered checkpoint."""
        self.require(checkpoint_id)
        if problems := self.verify(checkpoint_id):
            raise self._damaged(checkpoint_id, problems)
        self.store.atomic_write(f"{self.root}/promoted.json",
                                json.dumps({"checkpoint_id": checkpoint_id}).encode())

    def promoted_id(self) -> str | None:
        """The registered id the line's pointer names; None before the line's first promotion."""
        path = f"{self.root}/promoted.json"
        try:
            ckpt = validate_name(json.loads(self.store.read_bytes(path))["checkpoint_id"], "checkpoint id")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise self._bad_pointer(path, "is not JSON naming a checkpoint id") from None
        try:
            registered = self.meta(ckpt) is not None
        except RegistryError:  # registered, its meta damaged: `verify` reports that
            registered = True
        if not registered:
            raise self._bad_pointer(path, f"names {ckpt!r}, which is not registered")
        return ckpt

    def promoted(self) -> CheckpointMeta | None:
        ckpt = self.promoted_id()
        return None if ckpt is None else self.require(ckpt)

    def _bad_pointer(self, path: str, what: str) -> RegistryError:
        return RegistryError(
            f"{path} {what}: run `selfplay checkpoints promote <id> --store {self.store.url} --line {self.line}` "
            f"with a registered id, or delete {path} to start the line from its base")

    def lineage(self, checkpoint_id: str) -> list[CheckpointMeta]:
        chain, seen = [], set()
        cur: str | None = checkpoint_id
        while cur is not None and cur not in seen:
            seen.add(cur)
            meta = self.require(cur)
            chain.append(meta)
            cur = meta.parent
        return chain
