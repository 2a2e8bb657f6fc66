"""Self-play flows: they wire stages with dataset refs and hold no stage logic.

`generate_flow`: propose -> rollout -> judge -> select, the generation side of a cycle.
`stage_flow`: rerun one stage of an existing run from its cached upstream artifacts.
Each run keeps `<store>/<run>/_run.json`: its resolved config and the refs of every stage output, so a
single stage can be rerun later with a new config (say, a new rubric) and the rest served from the cache.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from configs.schema import CycleConfig
from flows.stages import run_sharded, stats
from model.embedded.umm import BASE_DIR
from model.loader import load_model, resolve_checkpoint_dir
from storage import DatasetRef, Registry, Store
from tasks import benchmark, judge, posttrain, propose, reconstruct, report, rollout, select
from tasks.common import StageContext, read
from tasks.report import headline_of

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
    if name == "propose":  # the held-out benchmark suite is never proposed
        plan = module.plan(inputs, cfg.propose, ctx, held_out(cfg))
    else:
        plan = module.plan(inputs, getattr(cfg, name), ctx)
    return {STAGE_OUTPUT[name]: run_sharded(module, plan, ctx, refresh, cfg.stages.retries, cfg.stages.retry_delay_s)}


def held_out(cfg: CycleConfig) -> frozenset[str]:
    return frozenset(benchmark.suite_canonical(cfg.benchmark)) if cfg.model.backend == "embedded" else frozenset()


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


# --- the full cycle ------------------------------------------------------------------------------------
@task(name="reconstruct", cache_policy=NO_CACHE)
def reconstruct_task(inputs: dict[str, DatasetRef], cfg: CycleConfig, ctx: StageContext) -> dict[str, DatasetRef]:
    return reconstruct.run(inputs, cfg.reconstruct, ctx)


@task(name="posttrain", cache_policy=NO_CACHE)
def posttrain_task(inputs: dict[str, DatasetRef], cfg: CycleConfig, ctx: StageContext) -> dict:
    parent_dir = resolve_checkpoint_dir(cfg.model, cfg.run.store)
    return posttrain.run(inputs, cfg.posttrain, ctx, parent_dir, cfg.model.registry_line)


@task(name="benchmark", cache_policy=NO_CACHE, task_run_name="benchmark {which}")
def benchmark_task(which: str, cfg: CycleConfig, ctx: StageContext) -> dict[str, DatasetRef]:
    return benchmark.run(cfg.benchmark, ctx)


@task(name="judge on parent images", cache_policy=NO_CACHE)
def judge_shift_task(parent_items: DatasetRef, cfg: CycleConfig, child_ctx: StageContext) -> dict:
    """The child's judge on the parent's benchmark images: the judge's own change, images held fixed."""
    return benchmark.judge_on_images(parent_items, cfg.benchmark, child_ctx)


def _child_context(cfg: CycleConfig, parent: StageContext, child_dir: str) -> tuple[CycleConfig, StageContext]:
    child_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": child_dir})})
    return child_cfg, make_context(child_cfg)


def _inline_images(md: str, folder: Path) -> str:
    """The report's PNG links as data URIs: the Prefect UI cannot reach files beside the datasets."""
    def embed(m: re.Match) -> str:
        png = folder / m.group(2)
        if not png.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", embed, md)


def _publish(run: str, cycle: int, rows: list[dict], md: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"{run}-cycle-{cycle}".lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(md, key=f"{key}-report", description="self-play cycle report")
    create_table_artifact(rows, key=f"{key}-metrics", description="parent vs child on the held-out suite")


@flow(name="selfplay-cycle", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def cycle_flow(config: CycleConfig, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """One full cycle: propose -> rollout -> judge -> select -> reconstruct -> posttrain -> benchmark -> gate."""
    cfg = config
    ctx = make_context(cfg)
    reg = Registry(cfg.run.store, cfg.model.registry_line)
    parent_dir = resolve_checkpoint_dir(cfg.model, cfg.run.store)
    parent_meta = reg.register(parent_dir or str(BASE_DIR), cycle=cfg.run.cycle)  # known to the registry
    if reg.promoted() is None:
        reg.promote(parent_meta.checkpoint_id)

    gen = generate_flow(cfg, previous)
    refs = {k: DatasetRef.model_validate(v) for k, v in load_run_state(cfg.run.store, cfg.run.name)["refs"].items()}
    cpr = reconstruct_task({k: refs[k] for k in ("prompts", "rollouts", "judgements", "selections")}, cfg, ctx)
    refs.update(cpr)
    save_run_state(cfg, cpr)
    trained = posttrain_task(cpr, cfg, ctx)

    parent_bench = benchmark_task("parent", cfg, ctx)
    child_cfg, child_ctx = _child_context(cfg, ctx, trained["dir"])
    child_bench = benchmark_task("child", child_cfg, child_ctx)
    parent_items = read(parent_bench["benchmark_items"]).to_pylist()
    child_items = read(child_bench["benchmark_items"]).to_pylist()
    parent_m, child_m = headline_of(parent_bench["benchmark"]), headline_of(child_bench["benchmark"])
    shift = judge_shift_task(parent_bench["benchmark_items"], child_cfg, child_ctx)
    parent_m[report.JUDGE_FIXED] = parent_m["judge_oracle_agreement"]  # on its own images, which are the fixed ones
    child_m[report.JUDGE_FIXED] = shift["judge_oracle_agreement"]
    promoted, why, deltas = report.gate(parent_items, child_items, parent_m, child_m, cfg.gate, cfg.benchmark)
    deltas["judge"] = shift["delta"]
    reg.update_metrics(trained["checkpoint_id"], {"benchmark": child_m, "gate": why})
    reg.update_metrics(parent_meta.checkpoint_id, {"benchmark": parent_m})
    if promoted:
        reg.promote(trained["checkpoint_id"])

    # the report, beside the datasets
    out = Path(Store(cfg.run.store).path(cfg.run.name, f"report-cycle{cfg.run.cycle}"))
    out.mkdir(parents=True, exist_ok=True)
    rows = report.comparison_rows(parent_m, child_m)
    history = [{"cycle": m.cycle, **m.metrics.get("benchmark", {})} for m in reg.lineage(trained["checkpoint_id"])][::-1]
    report.plot_categories(parent_bench["benchmark"], child_bench["benchmark"], out / "per_category.png")
    report.plot_history(history, out / "history.png")
    report.image_grid(refs, out / "best_worst.png")
    md = report.markdown(cfg.run.name, cfg.run.cycle, rows, why, deltas,
                         {"per-category generation accuracy": "per_category.png", "metrics across cycles":
                          "history.png", "best and worst of N (own judge)": "best_worst.png"}, flags=[])
    (out / "report.md").write_text(md)
    _publish(cfg.run.name, cfg.run.cycle, rows, _inline_images(md, out))
    summary = {"parent": {"checkpoint_id": ctx.model_id, **parent_m},
               "child": {"checkpoint_id": trained["checkpoint_id"], **child_m},
               "promoted": promoted, "reason": why, "run": cfg.run.name, "cycle": cfg.run.cycle,
               "delta_gen_acc_oracle": deltas["gen"], "delta_judge_on_parent_images": deltas["judge"],
               "report": str(out / "report.md"),
               "posttrain": {k: trained["metrics"].get(k) for k in ("train_s", "tokens_per_s", "heldout_before",
                                                                    "heldout_after", "world_size")},
               "generation": {k: gen[k] for k in ("propose", "judge")}}
    save_run_state(cfg, {}, {f"cycle{cfg.run.cycle}": summary})
    return summary


@flow(name="selfplay-nightly", log_prints=True)
def nightly_flow(config: CycleConfig, cycles: int = 3) -> list[dict[str, Any]]:
    """N cycles, each from the promoted checkpoint and the previous cycle's discard pool and seed library."""
    results, previous = [], None
    for c in range(cycles):
        run = config.run.model_copy(update={"cycle": config.run.cycle + c})
        model = config.model if c == 0 else config.model.model_copy(update={"checkpoint": "promoted"})
        cfg = config.model_copy(update={"run": run, "model": model})
        results.append(cycle_flow(cfg, previous))
        previous = {"refs": load_run_state(cfg.run.store, cfg.run.name)["refs"]}
    return results
