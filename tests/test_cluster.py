"""Shards on a real Dask cluster (LocalCluster worker processes through prefect-dask): the same datasets as one
process, a killed worker costing only its shard, per-stage worker limits, and an unreachable scheduler refused
before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from typer.testing import CliRunner

from configs.schema import CycleConfig
from flows.cli import app
from storage import Dataset, RunRecords

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": {"device": "cpu"}, "propose": {"num_prompts": 48}, "rollout": {"prompts_per_shard": 12},
         "posttrain": {"steps": 8, "micro_batch": 16, "checkpoint_every": 4},
         "benchmark": {"prompts_per_category": 4, "samples": 2, "bootstrap": 200}}
TIMING = {"gen_ms"}  # how long a sample took: the only column allowed to differ


def cfg(store, cluster, **stages):
    return CycleConfig.model_validate({**SMALL, "run": {"name": "c", "store": str(store), "cluster": cluster},
                                       "stages": {"workers": 2, **stages}})


def rows(ref):
    return sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True, default=str)
                  for r in Dataset(ref).read().to_pylist())


def test_a_cycle_on_two_dask_workers_writes_what_one_process_writes(tmp_path, prefect_api):
    from flows.cycle import cycle_flow

    local = cycle_flow(cfg(tmp_path / "local", "local"))
    dask = cycle_flow(cfg(tmp_path / "dask", "dask", scale={"judge": 1}))
    a, b = RunRecords(str(tmp_path / "local"), "c").load(0), RunRecords(str(tmp_path / "dask"), "c").load(0)
    assert a.nodes.keys() == b.nodes.keys()
    for node in a.nodes:
        for name, ref in a.nodes[node].outputs.items():
            other = b.nodes[node].outputs[name]
            assert ref.fingerprint == other.fingerprint, (node, name)
            if node not in ("posttrain", "report"):  # those rows name their folders and timings
                assert rows(ref) == rows(other), (node, name)
    assert dask["child"]["checkpoint_id"] == local["child"]["checkpoint_id"]
    assert dask["child"]["gen_acc_oracle"] == local["child"]["gen_acc_oracle"]
    # the shards ran on the workers: rollout on both, judge on the one stages.scale allows
    assert Dataset(b.outputs("rollout")["rollouts"]).manifest().timings["workers"] == 2
    assert Dataset(b.outputs("judge")["judgements"]).manifest().timings["workers"] == 1


def _workers(pid: int) -> list[psutil.Process]:
    """The Dask worker processes a command started (multiprocessing spawn children, not its resource tracker)."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            out.append(p)
    return out


def test_a_killed_worker_loses_only_its_shard(tmp_path, prefect_api):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg(tmp_path, "dask").model_copy(update={
        "propose": CycleConfig().propose.model_copy(update={"num_prompts": 64}),
        "rollout": CycleConfig().rollout.model_copy(update={"prompts_per_shard": 2})}).model_dump(mode="json")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=prefect_api)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "generate", str(path)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 240
    while time.time() < deadline and proc.poll() is None and killed is None:
        parts = list(tmp_path.glob("c/rollouts-*/part-*.json"))
        workers = _workers(proc.pid)
        if len(parts) >= 3 and workers and not list(tmp_path.glob("c/rollouts-*/_manifest.json")):
            workers[0].send_signal(signal.SIGKILL)
            killed = workers[0].pid
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "the rollout finished before a worker could be killed"
    assert proc.returncode == 0, err[-3000:]
    ref = RunRecords(str(tmp_path), "c").load(0).outputs("rollout")["rollouts"]
    got = [(r["prompt_id"], r["sample_idx"]) for r in Dataset(ref).read(["prompt_id", "sample_idx"]).to_pylist()]
    assert len(got) == 64 * 8 and len(set(got)) == 64 * 8
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in Dataset(ref).parquet_files()) == 64 * 8


def test_an_unreachable_scheduler_is_refused_before_any_work(tmp_path, prefect_api):
    res = CliRunner().invoke(app, ["generate", str(ROOT / "configs/cycle/smoke.yaml"), f"run.store={tmp_path}",
                                   "run.cluster=tcp://127.0.0.1:9"])
    assert res.exit_code == 2 and "no Dask scheduler answers at tcp://127.0.0.1:9" in res.output
    assert not any(tmp_path.iterdir()), "nothing written"


def test_stages_scale_names_only_sharded_stages(tmp_path, prefect_api):
    res = CliRunner().invoke(app, ["generate", str(ROOT / "configs/cycle/smoke.yaml"), f"run.store={tmp_path}",
                                   "run.cluster=dask", "stages.scale.select=2"])
    assert res.exit_code == 2 and "stages.scale names ['select']" in res.output
    assert not any(tmp_path.iterdir()), "nothing written"
