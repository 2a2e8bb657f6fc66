"""Self-play flows: they wire stages with dataset refs and hold no stage logic.

`generate_flow`: propose -> rollout -> judge -> select, the generation side of a cycle.
`stage_flow`: rerun one stage of an existing run from its cached upstream artifacts.
Each run keeps `<store>/<run>/_run.json`: its resolved config and the refs of every stage output, so a
single stage can be rerun later with a new config (say, a new rubric) and the rest served from the cache.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from configs.schema import CycleConfig
from flows.stages import run_sharded, stats
from model.loader import load_model
from storage import DatasetRef, Store
from tasks import judge, propose, rollout, select
from tasks.common import StageContext

SHARDED = {"prompts": propose, "rollouts": rollout, "judgements": judge}
STAGE_INPUTS = {"propose": [], "rollout": ["prompts"], "judge": ["prompts", "rollouts"],
                "select": ["prompts", "judgements"]}
STAGE_OUTPUT = {"propose": "prompts", "rollout": "rollouts", "judge": "judgements", "select": "selections"}


def make_context(cfg: CycleConfig) -> StageContext:
    model = load_model(cfg.model, cfg.run.store)
    return StageContext(store=cfg.run.store, run=cfg.run.name, run_seed=cfg.run.seed, cycle=cfg.run.cycle,
                        model_loader=lambda: model, model_id=model.model_id,
                        log=lambda msg: print(msg, flush=True))


def run_state_path(store: str, run: str) -> str:
    return Store(store).path(run, "_run.json")


def load_run_state(store: str, run: str) -> dict[str, Any]:
    try:
        return json.loads(Store(store).read_bytes(run_state_path(store, run)))
    except FileNotFoundError:
        return {"refs": {}}


def save_run_state(cfg: CycleConfig, refs: dict[str, DatasetRef], extra: dict[str, Any] | None = None) -> None:
    state = load_run_state(cfg.run.store, cfg.run.name)
    state["config"] = cfg.model_dump(mode="json")
    state["refs"].update({k: v.model_dump() for k, v in refs.items()})
    state.update(extra or {})
    Store(cfg.run.store).atomic_write(run_state_path(cfg.run.store, cfg.run.name),
                                      json.dumps(state, indent=1).encode())


@task(name="select", cache_policy=NO_CACHE)
def select_task(inputs: dict[str, DatasetRef], cfg: CycleConfig, ctx: StageContext,
                refresh: bool = False) -> dict[str, DatasetRef]:
    return select.run(inputs, cfg.select, ctx, refresh)


def run_stage(name: str, inputs: dict[str, DatasetRef], cfg: CycleConfig, ctx: StageContext,
              refresh: bool = False) -> dict[str, DatasetRef]:
    """One stage by its CLI name; returns the refs it produced."""
    if name == "select":
        return select_task(inputs, cfg, ctx, refresh)
    module = SHARDED[STAGE_OUTPUT[name]]
    plan = module.plan(inputs, getattr(cfg, name), ctx)
    return {STAGE_OUTPUT[name]: run_sharded(module, plan, ctx, refresh)}


def _previous(cfg: CycleConfig, prev: dict[str, Any] | None) -> dict[str, DatasetRef]:
    """The discard pool and seed library a previous cycle left, as propose/select inputs."""
    refs = (prev or {}).get("refs", {})
    return {k: DatasetRef.model_validate(refs[k]) for k in ("discard_pool", "seed_library") if k in refs}


@flow(name="selfplay-generate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_flow(config: CycleConfig, previous: dict[str, Any] | None = None,
                  refresh: list[str] | None = None) -> dict[str, Any]:
    """propose -> rollout -> judge -> select on one model checkpoint; returns the refs and stage stats."""
    cfg = config
    refresh = set(refresh or [])
    ctx = make_context(cfg)
    carried = _previous(cfg, previous)
    refs: dict[str, DatasetRef] = {}
    for name in ("propose", "rollout", "judge", "select"):
        inputs = {k: refs[k] for k in STAGE_INPUTS[name]}
        if name == "propose":
            inputs.update(carried)
        if name == "select":
            inputs.update(carried)
        refs.update(run_stage(name, inputs, cfg, ctx, refresh=name in refresh))
        save_run_state(cfg, refs, {"model_id": ctx.model_id})
    summary = {"run": cfg.run.name, "model_id": ctx.model_id,
               "refs": {k: v.path for k, v in refs.items()},
               "propose": stats(refs["prompts"]), "judge": stats(refs["judgements"])}
    return summary


@flow(name="selfplay-stage", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def stage_flow(stage: str, config: CycleConfig, refresh: bool = False) -> dict[str, str]:
    """Rerun one stage of an existing run, reading its upstream datasets from the run's record."""
    if stage not in STAGE_INPUTS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGE_INPUTS)}")
    state = load_run_state(config.run.store, config.run.name)
    refs = {k: DatasetRef.model_validate(v) for k, v in state["refs"].items()}
    missing = [k for k in STAGE_INPUTS[stage] if k not in refs]
    if missing:
        raise ValueError(f"run {config.run.name!r} has no {', '.join(missing)} yet: run the stages before "
                         f"{stage!r} first (selfplay generate)")
    inputs = {k: refs[k] for k in STAGE_INPUTS[stage]}
    if stage in ("propose", "select"):
        inputs.update(_previous(config, state.get("previous")))
    ctx = make_context(config)
    out = run_stage(stage, inputs, config, ctx, refresh)
    save_run_state(config, out)
    return {k: v.path for k, v in out.items()}


def config_for_run(store: str, run: str, overrides: list[str]) -> CycleConfig:
    """A run's recorded config with overrides applied (for one-stage reruns)."""
    from configs.loader import apply_overrides, validate

    state = load_run_state(store, run)
    if "config" not in state:
        raise FileNotFoundError(f"no run {run!r} in store {os.path.abspath(store) if '://' not in store else store}")
    data = apply_overrides(state["config"], overrides, f"run {run}")
    return validate(CycleConfig, data, f"run {run} (recorded config)")
