"""The one runner: executes any DAG of stages (flows/dags.py) as Prefect tasks, and records what each ran.

A sharded stage becomes one task per missing shard (retried with exponential backoff) and a commit task cached
on the dataset's store, run and fingerprint; the cache is trusted only while the dataset on disk is intact (a
damaged one is reported and its bad parts recomputed). Any other stage is one task. Every node is recorded in
the run record (storage/runs.py) as it finishes: its resolved inputs, outputs, checkpoint id and config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff
from tqdm.auto import tqdm

from configs.schema import CycleConfig
from flows.cluster import prepare_workers, release_workers, task_runner
from flows.dags import Dag, DagError, Node
from flows.preflight import node_config, preflight
from storage import Dataset, DatasetRef, NodeRecord, RunRecord, RunRecords, Store, commit_parts
from tasks import STAGES, models
from tasks.stage import StageContext, StagePlan, StageSpec, read_row


class DatasetCache(CachePolicy):
    """Cache key = where the dataset lives and its fingerprint: one store's cache never answers for another's."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        ref: DatasetRef = inputs["plan"].ref
        return "selfplay-" + hashlib.sha256(f"{Store(ref.store).root}|{ref.path}".encode()).hexdigest()[:32]


@task(name="shard", cache_policy=NO_CACHE, task_run_name="{node}[{index}]")
def shard_task(node: str, index: int, module: Any, plan: StagePlan, ctx: StageContext) -> dict:
    """Compute one part unless it is already committed (a Dask worker writes it straight to the store).
    The times exclude loading the model, which a worker does once per checkpoint."""
    if module.STAGE.model and Dataset(plan.ref).committed_part(index) is None:
        ctx.model  # noqa: B018  (resident from now on)
    t0 = time.time()
    computed = Dataset(plan.ref).ensure_part(index, lambda: module.compute_part(plan, index, ctx))[1]
    return {"computed": computed, "worker": worker_name(), "t0": t0, "t1": time.time()}


@task(name="commit", cache_policy=DatasetCache(), persist_result=True, result_serializer="json",
      task_run_name="commit {node}")
def commit_task(node: str, plan: StagePlan, timings: dict[str, float] | None = None) -> dict:
    commit_parts(plan.ref, plan.n_parts, config=plan.config, upstream=plan.inputs, model_id=plan.model_id,
                 code_version=plan.code_version, timings=timings)
    return plan.ref.model_dump()


@task(name="stage", cache_policy=NO_CACHE, task_run_name="{node}")
def stage_task(node: str, module: Any, inputs: dict[str, DatasetRef], cfg: Any, ctx: StageContext,
               refresh: bool) -> dict[str, DatasetRef]:
    return module.run(inputs, cfg, ctx, refresh)


def run_sharded(node: str, module: Any, plan: StagePlan, ctx: StageContext, refresh: bool, cfg: CycleConfig,
                placement: dict | None) -> DatasetRef:
    """Map the stage's missing shards as Prefect tasks (on the workers the stage may use), with a progress bar
    and a progress artifact; the manifest is committed here once every part exists."""
    ds = Dataset(plan.ref)
    fresh, missing = refresh or not ds.intact(), []
    if refresh:
        ds.clear(plan.n_parts)
    elif fresh and ds.exists():  # damaged: forget the manifest, recompute the bad parts
        ctx.log(f"[{node}] damaged dataset {plan.ref.name}: {'; '.join(ds.verify())}")
        Store(plan.ref.store).remove(ds.manifest_path)
    if fresh:
        missing = [i for i in range(plan.n_parts) if ds.committed_part(i) is None]
        if missing:
            artifact = create_progress_artifact(0.0, description=f"{node}: {len(missing)} shards")
            shard = shard_task.with_options(
                retries=cfg.stages.retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=cfg.stages.retry_delay_s))
            with where(module.STAGE, placement, cfg):
                futures = [shard.submit(node, i, module, plan, ctx) for i in missing]
            ran = []
            with tqdm(total=len(missing), desc=node, unit="shard") as bar:
                for done, fut in enumerate(as_completed(futures), 1):
                    ran.append(fut.result())
                    bar.update()
                    update_progress_artifact(artifact, 100.0 * done / len(missing))
            workers = sorted({r["worker"] for r in ran})
            # from the first shard's start to the last one's end, model loading excluded: what bench scale reads
            timings = {"wall_s": round(max(r["t1"] for r in ran) - min(r["t0"] for r in ran), 4),
                       "compute_s": round(sum(r["t1"] - r["t0"] for r in ran), 4), "workers": len(workers)}
            if placement is not None:
                ctx.log(f"[{node}] {len(missing)} shards on {len(workers)} worker(s): {', '.join(workers)}")
    commit_task.with_options(refresh_cache=fresh)(node, plan, timings if fresh and missing else None)
    # the plan's own ref, never the cache's answer: a cache hit happens only over an intact dataset at this ref,
    # and a run's refs must not point into another store or run whatever a cache holds
    return plan.ref


def worker_name() -> str:
    """The Dask worker running this, or 'local'."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "local"


def where(spec: StageSpec, placement: dict | None, cfg: CycleConfig):
    """Dask annotations for a stage's shards: the workers it may use (`stages.scale`) and, on GPU workers, one GPU
    per shard for a stage that runs a model."""
    if placement is None:
        return contextlib.nullcontext()
    import dask

    annotations: dict[str, Any] = {}
    if spec.name in cfg.stages.scale:
        annotations.update(workers=placement["workers"][: cfg.stages.scale[spec.name]], allow_other_workers=False)
    if placement["gpu"] and spec.model:
        annotations["resources"] = {"GPU": 1}
    return dask.annotate(**annotations)


class Contexts:
    """One stage context per checkpoint a DAG runs: the parent, and each posttrain node's child."""

    def __init__(self, cfg: CycleConfig, replay: bool):
        self.cfg, self.replay = cfg, replay
        self.by_id: dict[str, StageContext] = {}

    def for_checkpoint(self, checkpoint_id: str) -> StageContext:
        if checkpoint_id not in self.by_id:
            section = self.cfg.model.model_copy(update={"checkpoint": checkpoint_id})
            ckpt = models.resolve(section, self.cfg.run.store, self.cfg.run.cycle)
            by_id = section.model_copy(update={"checkpoint": ckpt.checkpoint_id})
            self.by_id[checkpoint_id] = StageContext(
                store=self.cfg.run.store, run=self.cfg.run.name, run_seed=self.cfg.run.seed,
                cycle=self.cfg.run.cycle, model_loader=models.Loader(by_id, self.cfg.run.store),
                model_id=ckpt.checkpoint_id, model_dir=ckpt.directory, registry_line=section.registry_line,
                replay=self.replay, log=lambda msg: print(msg, flush=True))
        return self.by_id[checkpoint_id]


def _publish(node: str, ref: DatasetRef, run: str, cycle: int) -> None:
    row = read_row(ref, ("table",))
    key = f"{run}-cycle-{cycle}-{node}".lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(row["markdown"], key=f"{key}", description=f"{node}: self-play cycle report")
    create_table_artifact(row["table"], key=f"{key}-metrics", description="parent vs child")


def _inputs(dag: Dag, node: Node, outputs: dict[str, dict[str, DatasetRef]],
            carried: dict[str, DatasetRef]) -> dict[str, DatasetRef]:
    spec = STAGES[node.stage].STAGE
    found: dict[str, DatasetRef] = {}
    for name, (src, output) in dag.bindings(node).items():
        ref = carried.get(output) if not src else outputs.get(src, {}).get(output)
        if ref is not None:
            found[name] = ref
        elif name in spec.inputs:
            raise DagError(f"node {node.id!r} needs {name!r} from node {src!r}, which has not run in this record "
                           "(run the cycle first)")
    return found


def run_dag(dag: Dag, cfg: CycleConfig, *, carried: dict[str, DatasetRef] | None = None,
            given: dict[str, NodeRecord] | None = None, nodes: list[str] | None = None,
            refresh: frozenset[str] = frozenset(), replay: bool = False, variant: str = "") -> RunRecord:
    """Execute `nodes` of the DAG (default: all) in order, as a Prefect flow run on the task runner `run.cluster`
    asks for; `given` nodes are taken from an earlier record. Checked before any work: the preflight
    (flows/preflight.py), and that a scheduler address answers."""
    preflight(dag, cfg, refresh, nodes)
    args = (dag, cfg, carried, given, nodes, sorted(refresh), replay, variant)
    if runs_here(cfg):  # the calling flow's task runner is the one asked for: its run shows the stages
        return execute(*args)
    flow_ = dag_flow.with_options(task_runner=task_runner(cfg),
                                  flow_run_name=f"{dag.name}: {cfg.run.name} cycle {cfg.run.cycle}")
    return flow_(*args)


def runs_here(cfg: CycleConfig) -> bool:
    """Whether the current flow run's task runner is the one `run.cluster` asks for."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    ctx = FlowRunContext.get()
    if ctx is None:
        return False
    if cfg.run.cluster == "local":
        return isinstance(ctx.task_runner, ThreadPoolTaskRunner)
    from prefect_dask import DaskTaskRunner

    return isinstance(ctx.task_runner, DaskTaskRunner) and (
        cfg.run.cluster == "dask" or ctx.task_runner.address == cfg.run.cluster)


@flow(name="selfplay-dag", log_prints=True, validate_parameters=False)
def dag_flow(*args) -> RunRecord:
    """A DAG in a flow run of its own, on the task runner `run.cluster` asks for (a Prefect UI run whose
    deployment's task runner is another one)."""
    return execute(*args)


def execute(dag: Dag, cfg: CycleConfig, carried: dict[str, DatasetRef] | None, given: dict[str, NodeRecord] | None,
            nodes: list[str] | None, refresh: list[str], replay: bool, variant: str) -> RunRecord:
    """The one runner, inside a flow run: the DAG's nodes in order, each recorded as it finishes."""
    placement = prepare_workers(cfg) if cfg.run.cluster != "local" else None
    records = RunRecords(cfg.run.store, cfg.run.name)
    ctxs = Contexts(cfg, replay)
    parent = ctxs.for_checkpoint(cfg.model.checkpoint)  # 'base', 'promoted', a directory or an id, once
    ctxs.by_id.setdefault(parent.model_id, parent)
    resolved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": parent.model_id})})
    ctxs.cfg = resolved
    if carried is None:
        prev = records.find(cfg.run.cycle - 1) if cfg.run.cycle > 0 else None
        carried = {k: v for k, v in (prev.outputs("select") if prev and "select" in prev.nodes else {}).items()
                   if k in ("discard_pool", "seed_library")}
    record = RunRecord(run=cfg.run.name, cycle=cfg.run.cycle, dag=dataclasses.asdict(dag),
                       config=resolved.model_dump(mode="json"), checkpoint_id=parent.model_id, carried=carried,
                       variant=variant)
    outputs: dict[str, dict[str, DatasetRef]] = {}
    for node in dag.nodes:
        if given and node.id in given:
            record.nodes[node.id] = given[node.id]
            outputs[node.id] = given[node.id].outputs
            continue
        if nodes is not None and node.id not in nodes:
            continue
        module = STAGES[node.stage]
        spec = module.STAGE
        inputs = _inputs(dag, node, outputs, carried)
        section = node_config(resolved, spec.section, node.overrides, node.id)
        ctx = parent if node.model == "parent" else ctxs.for_checkpoint(
            read_row(outputs[node.model]["checkpoint"])["checkpoint_id"])
        if spec.sharded:
            plan = module.plan(inputs, section, ctx)
            outputs[node.id] = {plan.ref.stage: run_sharded(node.id, module, plan, ctx, node.id in refresh,
                                                            resolved, placement)}
        else:
            if spec.exclusive and placement is not None:
                release_workers()
            outputs[node.id] = stage_task(node.id, module, inputs, section, ctx, node.id in refresh)
        record.nodes[node.id] = NodeRecord(stage=node.stage, inputs=inputs, outputs=outputs[node.id],
                                           checkpoint_id=ctx.model_id if spec.model else None,
                                           config=json.loads(json.dumps(section, default=_dump)))
        if not replay or variant:
            records.save(record)
        if spec.artifact:
            _publish(node.id, outputs[node.id][spec.artifact], cfg.run.name, cfg.run.cycle)
    return record


def _dump(obj: Any) -> Any:
    return obj.model_dump(mode="json")
