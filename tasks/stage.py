"""The stage contract every pipeline step follows, and what stages share: context, plan, sequential runner.

A stage module defines `STAGE = StageSpec(...)`: its name, the datasets it reads and writes (with Arrow
schemas), its config section(s) and code version. Then either `plan(inputs, cfg, ctx) -> StagePlan` +
`compute_part(plan, i, ctx) -> pyarrow.Table` (sharded: one Parquet part per shard), or one
`run(inputs, cfg, ctx, refresh) -> {output: DatasetRef}`. `cfg` is the stage's config section (a dict of
sections when the stage reads several). The Prefect runner (flows/runner.py) maps `compute_part` over the
missing shards and commits; `run_in_process` does the same without Prefect, so a stage runs and is tested without
Prefect and resumes under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from storage import Dataset, DatasetRef, build, fingerprint

log = logging.getLogger("selfplay")


@dataclass(frozen=True)
class StageSpec:
    """What a stage declares, checked before a DAG runs: every input must be some earlier stage's output."""

    name: str
    code_version: str
    section: str | tuple[str, ...] | None  # the CycleConfig section(s) it reads
    inputs: tuple[str, ...] = ()  # datasets it needs
    optional: tuple[str, ...] = ()  # datasets it reads when a DAG provides them (a previous cycle's pool)
    outputs: Mapping[str, pa.Schema] = field(default_factory=dict)
    model: bool = True  # runs the node's model (its checkpoint id enters the fingerprint)
    sharded: bool = False  # plan + compute_part; else run
    artifact: str | None = None  # an output with `markdown` and `table` columns the runner publishes
    exclusive: bool = False  # takes every GPU of the machine: Dask workers release their resident models first


@dataclass
class StageContext:
    """Where a stage writes, with which model checkpoint. `model` is loaded lazily, once per process."""

    store: str
    run: str
    run_seed: int = 0
    cycle: int = 0
    model_loader: Callable[[], Any] | None = None
    model_id: str | None = None
    model_dir: str | None = None  # the checkpoint's local directory (post-training starts from it)
    registry_line: str = "default"
    replay: bool = False  # a one-stage rerun of a recorded cycle: decides, but never moves the promoted pointer
    log: Callable[[str], None] = print
    _model: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        # a context travels to workers without its loaded model: each worker loads (and keeps) its own
        return {**self.__dict__, "_model": None}

    @property
    def model(self) -> Any:
        if self._model is None:
            if self.model_loader is None:
                raise RuntimeError("this stage needs a model, but the context has none")
            self._model = self.model_loader()
        return self._model


@dataclass
class StagePlan:
    """The output dataset (its ref is fixed by the fingerprint) and how its rows split into shards."""

    ref: DatasetRef
    n_parts: int
    inputs: Mapping[str, DatasetRef]
    config: Any
    code_version: str
    model_id: str | None
    shards: list[Any] = field(default_factory=list)  # per-part work description (e.g. prompt id ranges)
    extra: dict[str, Any] = field(default_factory=dict)


def config_dict(cfg: Any) -> Any:
    """A config as fingerprinted: JSON values, without the fields a model lists as `speed_only` (how fast or from
    where, never what comes out)."""
    if isinstance(cfg, BaseModel):
        out = cfg.model_dump(mode="json", exclude=set(getattr(cfg, "speed_only", ())))
        for k in out:
            if isinstance(getattr(cfg, k, None), BaseModel):
                out[k] = config_dict(getattr(cfg, k))
        return out
    if isinstance(cfg, dict):
        return {k: config_dict(v) for k, v in cfg.items()}
    return cfg


def make_plan(spec: StageSpec, inputs: Mapping[str, DatasetRef], config: Any, ctx: StageContext,
              n_parts: int = 1, shards: list[Any] | None = None, dataset: str | None = None,
              shared_run: str | None = None, **extra: Any) -> StagePlan:
    """Fingerprint the stage and fix its output ref. `dataset` names one of the stage's outputs (default: its
    first). A `shared_run` dataset does not depend on the run (its seed or cycle): it lives under that run name
    so every run that meets the same inputs reuses it (benchmarks of a checkpoint, say)."""
    dataset = dataset or next(iter(spec.outputs))
    if dataset not in spec.outputs:
        raise ValueError(f"stage {spec.name!r} declares no output {dataset!r}")
    model_id = ctx.model_id if spec.model else None
    scope = {} if shared_run else {"run_seed": ctx.run_seed, "cycle": ctx.cycle}
    fp = fingerprint(spec.name, {"config": config_dict(config), **scope}, inputs, model_id, spec.code_version)
    ref = DatasetRef(store=ctx.store, run=shared_run or ctx.run, stage=dataset, fingerprint=fp)
    return StagePlan(ref=ref, n_parts=n_parts, inputs=dict(inputs), config=config_dict(config),
                     code_version=spec.code_version, model_id=model_id, shards=shards or [], extra=extra)


def build_plan(plan: StagePlan, compute_part: Callable[[int], pa.Table], ctx: StageContext,
               refresh: bool = False) -> DatasetRef:
    """Materialise a plan in this process: reuse it if intact, else compute the missing parts and commit."""
    res = build(plan.ref, plan.n_parts, compute_part, config=plan.config, upstream=plan.inputs,
                model_id=plan.model_id, code_version=plan.code_version, log=ctx.log, refresh=refresh)
    verb = "reused" if res.reused else f"computed {len(res.computed_parts)}/{plan.n_parts} parts of"
    ctx.log(f"[{plan.ref.stage}] {verb} {plan.ref.name} ({res.manifest.rows} rows)")
    return plan.ref


def run_in_process(module: Any, inputs: Mapping[str, DatasetRef], cfg: Any, ctx: StageContext,
                   refresh: bool = False) -> dict[str, DatasetRef]:
    """Any stage in this process, without Prefect (a sharded one computes its parts here, in order)."""
    if not module.STAGE.sharded:
        return module.run(dict(inputs), cfg, ctx, refresh)
    p = module.plan(dict(inputs), cfg, ctx)
    return {p.ref.stage: build_plan(p, lambda i: module.compute_part(p, i, ctx), ctx, refresh)}


def read(ref: DatasetRef, columns: list[str] | None = None) -> pa.Table:
    return Dataset(ref).read(columns)


def read_row(ref: DatasetRef, json_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """The row of a one-row dataset (a checkpoint, a gate decision, a report), its JSON columns decoded."""
    row = read(ref).to_pylist()[0]
    return {k: json.loads(v) if k in json_columns else v for k, v in row.items()}


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any values: the same inputs give the same seed in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# propose's `source` of a prompt offered again from the discard pool (rollout gives it the pool's budget)
POOL_SOURCE = "discard-pool"


def prompt_id(text: str) -> str:
    """Stable id of a prompt: a hash of its exact text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def part_stats(ref: DatasetRef) -> dict[str, float]:
    """The per-part counters a stage left in its Parquet metadata (`stats`), summed."""
    import pyarrow.parquet as pq

    from storage import Store

    total: dict[str, float] = {}
    for f in Dataset(ref).parquet_files():
        meta = pq.read_schema(Store(ref.store).fs.open(f)).metadata or {}
        for k, v in json.loads(meta.get(b"stats", b"{}")).items():
            total[k] = total.get(k, 0) + v
    return total
