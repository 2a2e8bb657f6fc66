"""Prefect wiring shared by every flow: a stage = shard tasks mapped over the missing parts + a commit task.

The commit task is cached on the stage fingerprint (Prefect's default policy includes the run id and would never
reuse). The cache is trusted only while the dataset on disk is intact: a damaged or missing dataset forces a
refresh, and its shards are recomputed.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff
from tqdm.auto import tqdm

from storage import Dataset, Store, commit_parts
from tasks.common import StageContext, StagePlan


class FingerprintCache(CachePolicy):
    """Cache key = the stage fingerprint that the flow computed from config, upstream refs and model id."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        return f"selfplay-{inputs['key']}"


@task(name="shard", cache_policy=NO_CACHE, task_run_name="{stage}[{index}]")
def shard_task(stage: str, index: int, module: Any, plan: StagePlan, ctx: StageContext) -> bool:
    """Compute one part unless it is already committed; returns True if it computed."""
    return Dataset(plan.ref).ensure_part(index, lambda: module.compute_part(plan, index, ctx))[1]


@task(name="commit", cache_policy=FingerprintCache(), persist_result=True, result_serializer="json",
      task_run_name="commit {stage}")
def commit_task(stage: str, key: str, plan: StagePlan, ctx: StageContext) -> dict:
    commit_parts(plan.ref, plan.n_parts, config=plan.config, upstream=plan.inputs, model_id=plan.model_id,
                 code_version=plan.code_version)
    return plan.ref.model_dump()


def run_sharded(module: Any, plan: StagePlan, ctx: StageContext, refresh: bool = False, retries: int = 2,
                retry_delay_s: float = 2.0):
    """Map the stage's missing shards as Prefect tasks, with a progress bar and a progress artifact."""
    from storage import DatasetRef

    stage = plan.ref.stage
    ds = Dataset(plan.ref)
    fresh = refresh or not ds.intact()
    if refresh:
        ds.clear(plan.n_parts)
    elif fresh and ds.exists():  # damaged: forget the manifest, recompute the bad parts
        ctx.log(f"[{stage}] damaged dataset {plan.ref.name}: {'; '.join(ds.verify())}")
        Store(plan.ref.store).remove(ds.manifest_path)
    if fresh:
        missing = [i for i in range(plan.n_parts) if ds.committed_part(i) is None]
        if missing:
            artifact = create_progress_artifact(0.0, description=f"{stage}: {len(missing)} shards")
            shard = shard_task.with_options(retries=retries,
                                            retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s))
            futures = [shard.submit(stage, i, module, plan, ctx) for i in missing]
            with tqdm(total=len(missing), desc=stage, unit="shard") as bar:
                for done, fut in enumerate(as_completed(futures), 1):
                    fut.result()
                    bar.update()
                    update_progress_artifact(artifact, 100.0 * done / len(missing))
    out = commit_task.with_options(refresh_cache=fresh)(stage, plan.ref.fingerprint, plan, ctx)
    return DatasetRef.model_validate(out)


def stats(ref) -> dict:
    """The per-part stats a stage left in its Parquet metadata, summed."""
    import pyarrow.parquet as pq

    total: dict[str, float] = {}
    for f in Dataset(ref).parquet_files():
        meta = pq.read_schema(Store(ref.store).fs.open(f)).metadata or {}
        for k, v in json.loads(meta.get(b"stats", b"{}")).items():
            total[k] = total.get(k, 0) + v
    return total
