"""Self-play flows: each runs a DAG (flows/dags.py) through the one runner and returns what its stages wrote.

`generate_flow`: suite, propose -> rollout -> judge -> select, the generation side of a cycle.
`cycle_flow`: one full cycle, through the gate and the report.
`nightly_flow`: cycles chained: each from the promoted checkpoint and what the previous cycle carried.
`stage_flow`: rerun one stage of a recorded cycle, and what depends on it, from the run record.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from configs.loader import apply_overrides, validate
from configs.schema import CycleConfig, resolve_store
from flows.dags import CYCLE, GENERATE, Dag, DagError
from flows.preflight import preflight
from flows.runner import run_dag
from storage import RunRecord, RunRecords, validate_name
from tasks.report import summary_of
from tasks.stage import part_stats


def generation_summary(record: RunRecord) -> dict[str, Any]:
    refs = {k: v for n in ("propose", "rollout", "judge", "select") for k, v in record.outputs(n).items()}
    return {"run": record.run, "cycle": record.cycle, "model_id": record.checkpoint_id,
            "refs": {k: v.path for k, v in refs.items()},
            "propose": part_stats(refs["prompts"]), "judge": part_stats(refs["judgements"])}


@flow(name="selfplay-generate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_flow(config: CycleConfig, refresh: list[str] | None = None) -> dict[str, Any]:
    """suite, propose -> rollout -> judge -> select on one checkpoint; returns the refs and stage counters."""
    return generation_summary(run_dag(GENERATE, config, refresh=frozenset(refresh or [])))


@flow(name="selfplay-cycle", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def cycle_flow(config: CycleConfig) -> dict[str, Any]:
    """One full cycle: propose -> rollout -> judge -> select -> reconstruct -> posttrain -> benchmark -> gate."""
    return summary_of(run_dag(CYCLE, config).outputs("report")["report"])


@flow(name="selfplay-nightly", log_prints=True)
def nightly_flow(config: CycleConfig, cycles: int = 3) -> list[dict[str, Any]]:
    """N cycles, each from the promoted checkpoint and the previous cycle's discard pool and seed library."""
    results = []
    for c in range(cycles):
        run = config.run.model_copy(update={"cycle": config.run.cycle + c})
        model = config.model if c == 0 else config.model.model_copy(update={"checkpoint": "promoted"})
        t0 = time.perf_counter()
        summary = cycle_flow(config.model_copy(update={"run": run, "model": model}))
        results.append({**summary, "seconds": round(time.perf_counter() - t0, 1)})
    return results


@dataclass(frozen=True)
class Rerun:
    """What a one-stage rerun of a recorded cycle executes, resolved and checked before any flow starts."""

    record: RunRecord
    dag: Dag
    nodes: list[str]
    cfg: CycleConfig
    variant: str
    refresh: frozenset[str]


def plan_rerun(stage: str, run: str, cycle: int | None = None, overrides: list[str] | None = None,
               store: str = "./runs", only: bool = False, refresh: bool = False) -> Rerun:
    """The recorded DAG, the nodes a rerun of `stage` (a stage name or a node id) executes, and the recorded
    config with the overrides, through the same preflight as a run."""
    record = RunRecords(resolve_store(store), validate_name(run, "run name")).load(cycle)
    dag = Dag.from_dict(record.dag)
    targets = {n.id for n in dag.nodes if stage in (n.stage, n.id)}
    if not targets:
        raise DagError(f"stage {stage!r} is not in run {record.run!r} cycle {record.cycle} (its stages: "
                       f"{', '.join(dict.fromkeys(n.stage for n in dag.nodes))})")
    nodes = [n for n in dag.downstream(targets) if n in targets or not only]
    cfg = validate(CycleConfig, apply_overrides(json.loads(json.dumps(record.config)), overrides or [],
                                                f"run {run}"), f"run {run} cycle {record.cycle} (recorded config)")
    key = json.dumps([stage, only, refresh, overrides or []])
    variant = f"rerun-{hashlib.sha256(key.encode()).hexdigest()[:10]}" if overrides or refresh else ""
    fresh = frozenset(nodes[:1]) if refresh else frozenset()
    preflight(dag, cfg, fresh, nodes)
    return Rerun(record, dag, nodes, cfg, variant, fresh)


@flow(name="selfplay-stage", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def stage_flow(stage: str, run: str, cycle: int | None = None, overrides: list[str] | None = None,
               store: str = "./runs", only: bool = False, refresh: bool = False) -> dict[str, Any]:
    """Rerun one stage of a recorded cycle with its recorded inputs and checkpoint, and (unless `only`) what
    depends on it. With no override and no refresh, every dataset is the recorded one (a cache hit)."""
    r = plan_rerun(stage, run, cycle, overrides, store, only, refresh)
    given = {k: v for k, v in r.record.nodes.items() if k not in r.nodes}
    out = run_dag(r.dag, r.cfg, carried=r.record.carried, given=given, nodes=r.nodes, replay=True,
                  variant=r.variant, refresh=r.refresh)
    records = RunRecords(r.cfg.run.store, run)
    return {"run": run, "cycle": r.record.cycle, "record": records.path(r.record.cycle, r.variant)
            if r.variant else None,
            "nodes": {n: {"stage": out.nodes[n].stage, "checkpoint_id": out.nodes[n].checkpoint_id,
                          "outputs": {k: v.path for k, v in out.nodes[n].outputs.items()},
                          "recorded": {k: v.path for k, v in r.record.nodes[n].outputs.items()}
                          if n in r.record.nodes else None}
                      for n in r.nodes if n in out.nodes}}
