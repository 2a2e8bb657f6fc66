"""Where a DAG's shards run (`run.cluster`): this process, a Dask cluster started for the run, or an existing one.

`dask` starts a local cluster through prefect-dask's DaskTaskRunner: one single-threaded worker per GPU on a GPU
machine (dask-cuda's LocalCUDACluster where installed, else worker resources {"GPU": 1} with each worker pinned
to its own GPU), `stages.workers` single-process workers on a CPU machine. An address (tcp://host:8786) joins an
existing scheduler, whose workers must see the same store. Every worker keeps one model resident.
"""

from __future__ import annotations

from typing import Any

from configs.schema import CycleConfig
from flows.worker import ShardWorker


class ClusterError(RuntimeError):
    pass


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One clear error before any work when the scheduler cannot be reached."""
    from distributed import Client

    try:
        Client(address, timeout=f"{timeout_s}s").close()
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"run.cluster: no Dask scheduler answers at {address} within {timeout_s:g} s "
                           f"({type(exc).__name__}); start one (dask scheduler) or use run.cluster=local") from None


def task_runner(cfg: CycleConfig):
    """The Prefect task runner `run.cluster` asks for."""
    from prefect.task_runners import ThreadPoolTaskRunner

    cluster = cfg.run.cluster
    if cluster == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    import dask
    import distributed  # noqa: F401  (its config defaults load first, so the setting below stays)
    from prefect_dask import DaskTaskRunner

    # a nanny sets these in its own process, which for a local cluster is this one, and they would leak into the
    # post-training subprocess (one OpenMP thread: other float sums, another child); ShardWorker sets a worker's
    dask.config.set({"distributed.nanny.pre-spawn-environ": {}})
    if cluster != "dask":
        check_reachable(cluster)
        return DaskTaskRunner(address=cluster)
    gpus = gpu_count()
    if gpus and _has_dask_cuda():
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"threads_per_worker": 1, "resources": {"GPU": 1}})
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": gpus or cfg.stages.workers, "threads_per_worker": 1, "processes": True,
        "resources": {"GPU": 1} if gpus else {}, "dashboard_address": None})


def prepare_workers(cfg: CycleConfig) -> dict[str, Any]:
    """Register the worker plugin on the flow's Dask client; the workers' addresses and whether they hold GPUs."""
    from prefect.context import FlowRunContext

    flow_run = FlowRunContext.get()
    client = flow_run.task_runner.client  # starts the cluster (or connects) on first use
    gpus = gpu_count() if cfg.run.cluster == "dask" else 0
    client.register_plugin(ShardWorker(cfg.stages.threads_per_worker, 0 if _has_dask_cuda() else gpus,
                                       str(flow_run.client.api_url).rstrip("/")))
    workers = client.scheduler_info()["workers"]
    ordered = sorted(workers, key=lambda a: str(workers[a].get("name")))
    return {"workers": ordered, "gpu": any(w.get("resources", {}).get("GPU") for w in workers.values())}


def release_workers() -> None:
    """Every worker drops its resident models: post-training is about to take the machine's GPUs."""
    from prefect.context import FlowRunContext

    from model.registry import release_resident

    FlowRunContext.get().task_runner.client.run(release_resident)


def _has_dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401

        return True
    except ImportError:
        return False
