"""What every stage shares: its context, its plan (output ref + shards), and the sequential runner.

A stage module defines NAME, CODE_VERSION, `plan(inputs, cfg, ctx) -> StagePlan` and
`compute_part(plan, i, ctx) -> pyarrow.Table`. `run_stage` materialises a plan in-process; the Prefect
flows instead map `compute_part` over the missing shards and commit (flows/stages.py). Both go through
the same store calls, so a stage is testable without Prefect and resumable under it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from storage import DatasetRef, Dataset, build, fingerprint

log = logging.getLogger("selfplay")


@dataclass
class StageContext:
    """Where a stage writes and with which model. `model` is loaded lazily, once per process."""

    store: str
    run: str
    run_seed: int = 0
    cycle: int = 0
    model_loader: Callable[[], Any] | None = None
    model_id: str | None = None
    log: Callable[[str], None] = print
    _model: Any = field(default=None, repr=False)

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
    return cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg


def make_plan(stage: str, inputs: Mapping[str, DatasetRef], config: Any, ctx: StageContext, code_version: str,
              n_parts: int, shards: list[Any] | None = None, uses_model: bool = True,
              dataset: str | None = None, shared_run: str | None = None, **extra: Any) -> StagePlan:
    """Fingerprint the stage and fix its output ref. `dataset` names a second output of the same stage.

    A `shared_run` dataset does not depend on the run (its seed or cycle): it lives under that run name so
    every run that meets the same inputs reuses it (benchmarks of a checkpoint, say).
    """
    model_id = ctx.model_id if uses_model else None
    scope = {} if shared_run else {"run_seed": ctx.run_seed, "cycle": ctx.cycle}
    fp = fingerprint(stage, {"config": config_dict(config), **scope}, inputs, model_id, code_version)
    ref = DatasetRef(store=ctx.store, run=shared_run or ctx.run, stage=dataset or stage, fingerprint=fp)
    return StagePlan(ref=ref, n_parts=n_parts, inputs=dict(inputs), config=config_dict(config),
                     code_version=code_version, model_id=model_id, shards=shards or [], extra=extra)


def run_stage(plan: StagePlan, compute_part: Callable[[int], pa.Table], ctx: StageContext,
              refresh: bool = False) -> DatasetRef:
    res = build(plan.ref, plan.n_parts, compute_part, config=plan.config, upstream=plan.inputs,
                model_id=plan.model_id, code_version=plan.code_version, log=ctx.log, refresh=refresh)
    verb = "reused" if res.reused else f"computed {len(res.computed_parts)}/{plan.n_parts} parts of"
    ctx.log(f"[{plan.ref.stage}] {verb} {plan.ref.name} ({res.manifest.rows} rows)")
    return plan.ref


def read(ref: DatasetRef, columns: list[str] | None = None) -> pa.Table:
    return Dataset(ref).read(columns)


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any values: the same inputs give the same seed in every process."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def prompt_id(text: str) -> str:
    """Stable id of a prompt: a hash of its exact text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
