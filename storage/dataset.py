"""Datasets: Parquet parts plus a manifest written last and atomically.

    <store>/<run>/<stage>-<fp12>/part-NNNNN.parquet   one part per shard, each committed atomically
                                 part-NNNNN.json      the part's checksum, written after the part
                                 _manifest.json       written last: without it the dataset does not exist

A part counts as committed only when its bytes match the checksum beside it, so a shard killed
mid-write, truncated or bit-flipped is recomputed, never read as data. On local disk a lock per part
lets two processes build the same dataset at once: one computes each shard, the other waits and reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from configs.loader import canonical_json
from storage.names import validate_name
from storage.store import Store

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"


def fingerprint(stage: str, config: Any, upstream: Mapping[str, "DatasetRef | str"], model_id: str | None,
                code_version: str) -> str:
    """Same (stage, canonical config, upstream fingerprints, model id, stage code version) = same artifact."""
    ups = {k: (v.fingerprint if isinstance(v, DatasetRef) else v) for k, v in sorted(upstream.items())}
    text = canonical_json({"stage": stage, "config": config, "upstream": ups, "model": model_id,
                           "code": code_version})
    return hashlib.sha256(text.encode()).hexdigest()


class DatasetRef(BaseModel):
    """Small and JSON-able: what flows pass between stages instead of data."""

    store: str
    run: str
    stage: str
    fingerprint: str

    def model_post_init(self, _: Any) -> None:
        validate_name(self.run, "run name")
        validate_name(self.stage, "stage name")
        if len(self.fingerprint) < 12 or not all(c in "0123456789abcdef" for c in self.fingerprint):
            raise ValueError(f"invalid fingerprint {self.fingerprint!r}: expected hex digits")

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.fingerprint[:12]}"

    @property
    def path(self) -> str:
        return Store(self.store).path(self.run, self.name)

    def open(self) -> "Dataset":
        return Dataset(self)


class PartInfo(BaseModel):
    index: int
    file: str
    rows: int
    sha256: str
    bytes: int
    seconds: float = 0.0


class Manifest(BaseModel):
    schema_version: int
    run: str
    stage: str
    fingerprint: str
    rows: int
    parts: list[PartInfo]
    columns: dict[str, str]
    upstream: dict[str, str]
    config: Any
    model_id: str | None
    code_version: str
    timings: dict[str, float]
    created_at: str


class CorruptPartError(RuntimeError):
    pass


class Dataset:
    def __init__(self, ref: DatasetRef):
        self.ref = ref
        self.store = Store(ref.store)
        self.dir = ref.path

    # --- paths -----------------------------------------------------------------------------------
    def part_path(self, i: int) -> str:
        return f"{self.dir}/part-{i:05d}.parquet"

    def _sidecar(self, i: int) -> str:
        return f"{self.dir}/part-{i:05d}.json"

    @property
    def manifest_path(self) -> str:
        return f"{self.dir}/{MANIFEST}"

    def parquet_files(self) -> list[str]:
        return [f"{self.dir}/{p.file}" for p in self._require_manifest().parts]

    # --- manifest ----------------------------------------------------------------------------------
    def manifest(self) -> Manifest | None:
        try:
            return Manifest.model_validate_json(self.store.read_bytes(self.manifest_path))
        except FileNotFoundError:
            return None
        except ValueError:  # a manifest that does not parse is not a manifest
            return None

    def exists(self) -> bool:
        return self.manifest() is not None

    # --- parts -------------------------------------------------------------------------------------
    def _check_bytes(self, data: bytes, info: PartInfo) -> str | None:
        if len(data) != info.bytes:
            return f"{info.file}: {len(data)} bytes, expected {info.bytes} (truncated or overwritten)"
        if hashlib.sha256(data).hexdigest() != info.sha256:
            return f"{info.file}: checksum mismatch (corrupted)"
        return None

    def committed_part(self, i: int) -> PartInfo | None:
        """The part's info if its file is present and matches its checksum, else None."""
        try:
            info = PartInfo.model_validate_json(self.store.read_bytes(self._sidecar(i)))
            data = self.store.read_bytes(self.part_path(i))
        except (FileNotFoundError, ValueError):
            return None
        return None if self._check_bytes(data, info) else info

    def write_part(self, i: int, table: pa.Table, seconds: float = 0.0) -> PartInfo:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        data = buf.getvalue()
        info = PartInfo(index=i, file=f"part-{i:05d}.parquet", rows=table.num_rows,
                        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), seconds=round(seconds, 4))
        self.store.atomic_write(self.part_path(i), data)
        self.store.atomic_write(self._sidecar(i), info.model_dump_json().encode())
        return info

    def ensure_part(self, i: int, compute: Callable[[], pa.Table]) -> tuple[PartInfo, bool]:
        """Return the committed part `i`, computing it only if it is missing or damaged."""
        done = self.committed_part(i)
        if done is not None:
            return done, False
        with self.store.lock(f"{self.dir}/.lock-{i:05d}"):
            done = self.committed_part(i)  # another process may have finished it while we waited
            if done is not None:
                return done, False
            t0 = time.perf_counter()
            table = compute()
            return self.write_part(i, table, time.perf_counter() - t0), True

    def drop_part(self, i: int) -> None:
        self.store.remove(self._sidecar(i))
        self.store.remove(self.part_path(i))

    def clear(self, n_parts: int) -> None:
        """Forget the dataset: manifest first (it stops existing), then its parts."""
        self.store.remove(self.manifest_path)
        for i in range(n_parts):
            self.drop_part(i)

    def intact(self) -> bool:
        return self.exists() and not self.verify()

    # --- commit & read -------------------------------------------------------------------------
    def commit(self, parts: list[PartInfo], *, config: Any, upstream: Mapping[str, DatasetRef | str],
               model_id: str | None, code_version: str, timings: dict[str, float] | None = None) -> Manifest:
        schema = pq.read_schema(io.BytesIO(self.store.read_bytes(self.part_path(parts[0].index))))
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, run=self.ref.run, stage=self.ref.stage,
            fingerprint=self.ref.fingerprint, rows=sum(p.rows for p in parts), parts=parts,
            columns={f.name: str(f.type) for f in schema},
            upstream={k: (v.fingerprint if isinstance(v, DatasetRef) else v) for k, v in upstream.items()},
            config=json.loads(canonical_json(config)), model_id=model_id, code_version=code_version,
            timings=timings or {}, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.store.atomic_write(self.manifest_path, manifest.model_dump_json(indent=1).encode())
        return manifest

    def verify(self) -> list[str]:
        """Problems found in the committed parts (empty = every part matches the manifest)."""
        m = self.manifest()
        if m is None:
            return [f"{self.dir}: no manifest"]
        problems = []
        for p in m.parts:
            try:
                problem = self._check_bytes(self.store.read_bytes(f"{self.dir}/{p.file}"), p)
            except FileNotFoundError:
                problem = f"{p.file}: missing"
            if problem:
                problems.append(problem)
        return problems

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All rows, after checking every part against its checksum; a damaged part raises, never reads."""
        m = self._require_manifest()
        return pa.concat_tables([self._read_part(p, columns) for p in m.parts])

    def read_part(self, i: int, columns: list[str] | None = None) -> pa.Table:
        """The manifest's i-th part, checked against its checksum."""
        return self._read_part(self._require_manifest().parts[i], columns)

    def _require_manifest(self) -> Manifest:
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"dataset {self.dir} does not exist (no manifest)")
        return m

    def _read_part(self, p: PartInfo, columns: list[str] | None) -> pa.Table:
        data = self.store.read_bytes(f"{self.dir}/{p.file}")
        problem = self._check_bytes(data, p)
        if problem:
            raise CorruptPartError(f"dataset {self.dir}: {problem}")
        # one part is small and shards give the parallelism; pyarrow's reader threads over an in-memory file
        # also abort the interpreter at exit now and then ('terminate called without an active exception')
        return pq.read_table(io.BytesIO(data), columns=columns, use_threads=False)

    def to_polars(self, columns: list[str] | None = None):
        import polars as pl

        return pl.from_arrow(self.read(columns))


@dataclass
class BuildResult:
    ref: DatasetRef
    manifest: Manifest
    reused: bool
    computed_parts: list[int] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def commit_parts(ref: DatasetRef, n_parts: int, *, config: Any, upstream: Mapping[str, DatasetRef | str],
                 model_id: str | None, code_version: str, timings: dict[str, float] | None = None) -> Manifest:
    """Write the manifest over parts 0..n_parts-1, all of which must be committed and intact.

    Under a lock, and only if no intact manifest is there yet: of two concurrent writers, one commits.
    """
    ds = ref.open()
    parts = []
    for i in range(n_parts):
        info = ds.committed_part(i)
        if info is None:
            raise CorruptPartError(f"{ref.name}: part {i} is missing or damaged; cannot commit")
        parts.append(info)
    with ds.store.lock(f"{ds.dir}/.lock-manifest"):
        m = ds.manifest()
        if m is None or ds.verify():
            m = ds.commit(parts, config=config, upstream=upstream, model_id=model_id, code_version=code_version,
                          timings=timings)
    return m


def build(ref: DatasetRef, n_parts: int, compute_part: Callable[[int], pa.Table], *, config: Any,
          upstream: Mapping[str, DatasetRef | str], model_id: str | None, code_version: str,
          on_part: Callable[[int, bool], None] | None = None, log: Callable[[str], None] = print,
          refresh: bool = False) -> BuildResult:
    """Materialise `ref`: reuse it if committed and intact, else compute only the missing or damaged parts."""
    if n_parts < 1:
        raise ValueError(f"{ref.name}: a dataset needs at least one part (got n_parts={n_parts})")
    ds = ref.open()
    repaired: list[str] = []
    if refresh:
        ds.clear(n_parts)
    elif ds.exists():
        repaired = ds.verify()
        if not repaired:
            return BuildResult(ref, ds.manifest(), reused=True)
        for problem in repaired:
            log(f"[{ref.name}] damaged part found: {problem}; recomputing it")
        ds.store.remove(ds.manifest_path)
    t0 = time.perf_counter()
    parts, computed = [], []
    for i in range(n_parts):
        info, did = ds.ensure_part(i, lambda i=i: compute_part(i))
        parts.append(info)
        if did:
            computed.append(i)
        if on_part is not None:
            on_part(i, did)
    timings = {"wall_s": round(time.perf_counter() - t0, 4),
               "compute_s": round(sum(p.seconds for p in parts if p.index in computed), 4)}
    m = commit_parts(ref, n_parts, config=config, upstream=upstream, model_id=model_id, code_version=code_version,
                     timings=timings)
    return BuildResult(ref, m, reused=False, computed_parts=computed, repaired=repaired)


def check_store(store: str, run: str | None = None) -> Iterator[dict[str, Any]]:
    """Every dataset folder of a store (or of one run), checked part by part against its manifest: one report
    each, {dataset, rows, intact, problems}. A folder whose manifest does not parse, or names another dataset,
    is damaged too."""
    st = Store(store)
    runs = [st.path(validate_name(run, "run name"))] if run else st.folders(st.root)
    for run_dir in runs:
        if not st.exists(run_dir):
            raise FileNotFoundError(f"no run {run!r} in store {st.root}")
        for folder in st.folders(run_dir):
            if not st.exists(f"{folder}/{MANIFEST}"):
                continue  # not a dataset (a trainer's work folder, records) or one not committed yet
            try:
                m = Manifest.model_validate_json(st.read_bytes(f"{folder}/{MANIFEST}"))
                ref = DatasetRef(store=store, run=m.run, stage=m.stage, fingerprint=m.fingerprint)
            except ValueError:
                yield {"dataset": folder, "rows": None, "intact": False, "problems": [f"{MANIFEST}: unreadable"]}
                continue
            problems = Dataset(ref).verify() if ref.path == folder else [f"{MANIFEST} names {ref.path}"]
            yield {"dataset": folder, "rows": m.rows, "intact": not problems, "problems": problems}
