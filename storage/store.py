"""Where artifacts live: the local `./runs` directory by default, any fsspec URL otherwise.

Writes that must be all-or-nothing go through `atomic_write`: a temporary file in the same folder,
then a rename (os.replace on local disk; one object PUT on object stores, which is atomic per object).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

DEFAULT_STORE = "./runs"


@dataclass(frozen=True)
class Store:
    url: str = DEFAULT_STORE

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url)[0]

    @property
    def root(self) -> str:
        root = fsspec.core.url_to_fs(self.url)[1]
        return os.path.abspath(root) if self.is_local else root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(fsspec.core.url_to_fs(self.url)[0], LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def atomic_write(self, path: str, data: bytes) -> None:
        """Write `data` at `path` so that readers see either the old file or the whole new one."""
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def folders(self, path: str) -> list[str]:
        """The paths of the folders directly in `path`, sorted."""
        return sorted(e["name"].rstrip("/") for e in self.fs.ls(path, detail=True) if e["type"] == "directory")

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    @contextlib.contextmanager
    def lock(self, path: str) -> Iterator[None]:
        """An exclusive advisory lock (local disk only; the kernel frees it if the holder is killed).

        On object stores there is no lock: writers of one dataset must take disjoint shards
        (as fan-out workers do); each part is still committed atomically.
        """
        if not self.is_local:
            yield
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
