"""posttrain: DeepSpeed post-training on the CPR mixture (SFT) or on the DPO pairs, as a torchrun subprocess.

The subprocess (tasks/posttrain_worker.py) can be killed and resumed; this stage only plans, launches, waits
and registers the result in the checkpoint registry with its lineage (parent, data fingerprint, config).
The trainer works in `<store>/<run>/posttrain-<fp12>/` (`final/` once finished, with the checksums of its files:
a damaged `final/` is remade from the last checkpoint, never registered); the stage's output is a one-row
`checkpoint` dataset naming the child, which later stages of the DAG run as their model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from configs.schema import PosttrainConfig
from storage import DatasetRef, RegistryError, Store, checksums, differences, read_checksums
from tasks import models
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read_row

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = pa.schema([("checkpoint_id", pa.string()), ("parent", pa.string()), ("dir", pa.string()),
                        ("metrics", pa.string())])
# code version 2: EMA leaves integer buffers alone; 3: mixture-weighted loss; 4: judgement one fact a sequence
STAGE = StageSpec(name="posttrain", code_version="4", section="posttrain", inputs=("cpr", "dpo_pairs"),
                  optional=("groups",),
                  outputs={"checkpoint": CHECKPOINT}, exclusive=True)
TRAINS_ON = {"sft": "cpr", "dpo": "dpo_pairs", "grpo": "groups"}  # the dataset each objective trains on
# how often the trainer saves, whether layers are compiled and how the cross-entropy is chunked change speed, not
# the model: they stay out of the fingerprint. `nproc` does too, but the rank count it resolves to does not
# (`plan_of`): micro_batch is per rank, so the global batch grows with the ranks
SPEED_ONLY = {"nproc", "timeout_s", "checkpoint_every", "compile", "loss_chunk"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a killed stage leaves no orphaned trainer behind
    (an orphan would race the resumed run on the same checkpoint folder)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def rank_count(nproc: int | str) -> int:
    """'auto': one rank per GPU of this machine, one on a CPU machine."""
    if nproc != "auto":
        return int(nproc)
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def launch(job: dict, out: Path, nproc: int | str, timeout_s: int, log) -> None:
    """torchrun over `nproc` ranks on this machine (multi-node: DeepSpeed's hostfile launch, see the README)."""
    nproc = rank_count(nproc)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job_path.write_text(json.dumps({**job, "out_dir": str(out)}, indent=1))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tasks.posttrain_worker", str(job_path)]
    log(f"[posttrain] {' '.join(cmd[2:])}")
    with open(out / "worker.log", "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise TimeoutError(f"posttrain: worker exceeded {timeout_s}s; it resumes from its last checkpoint "
                               f"on the next run (log: {out / 'worker.log'})") from None
    if rc != 0:
        lines = (out / "worker.log").read_text(errors="replace").splitlines()
        own = [ln for ln in lines if ln.startswith("[rank")]  # the worker's own traceback, not torchrun's
        raise RuntimeError(f"posttrain: worker failed with exit code {rc} (log: {out / 'worker.log'}):\n"
                           + "\n".join((own or lines)[-15:]))


def run(inputs: dict[str, DatasetRef], cfg: PosttrainConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    """Train (or reuse) the child of the context's checkpoint and register it."""
    store = Store(ctx.store)
    if not store.is_local:
        raise NotImplementedError("posttrain writes its checkpoints to a local or mounted store path")
    if ctx.model_dir is None:
        raise ValueError("posttrain: the context names no parent checkpoint directory")
    if TRAINS_ON[cfg.objective] not in inputs:
        raise ValueError(f"posttrain.objective={cfg.objective} trains on the {TRAINS_ON[cfg.objective]!r} dataset, "
                         "which no input gives")
    p = plan_of(inputs, cfg, ctx)
    out = work_dir(p, ctx)

    def train(_: int) -> pa.Table:  # under the dataset's part lock: a second identical run waits, then reuses
        final = out / "final"
        if refresh:
            shutil.rmtree(out, ignore_errors=True)
        if (final / "_metrics.json").exists() and (problems := final_problems(final)):
            ctx.log(f"[posttrain] {final} is damaged ({'; '.join(problems)}): removing it; the trainer remakes it "
                    "from its last checkpoint")
            shutil.rmtree(final)
        if not (final / "_metrics.json").exists():
            job = {"posttrain": cfg.model_dump(mode="json"), "parent_dir": ctx.model_dir,
                   **{k: ref.model_dump() for k, ref in inputs.items()}}
            launch(job, out, cfg.nproc, cfg.timeout_s, ctx.log)
        metrics = (final / "_metrics.json").read_text()
        data = inputs[TRAINS_ON[cfg.objective]].fingerprint
        child = models.register(str(final), ctx.store, ctx.registry_line, expected=read_checksums(str(final)),
                                parent=ctx.model_id, cycle=ctx.cycle, data_fingerprint=data,
                                config=cfg.model_dump(mode="json"), metrics={"posttrain": json.loads(metrics)})
        return pa.Table.from_pylist([{"checkpoint_id": child, "parent": ctx.model_id, "dir": str(final),
                                      "metrics": metrics}], schema=CHECKPOINT)

    return {"checkpoint": build_plan(p, train, ctx, refresh)}


def final_problems(final: Path) -> list[str]:
    """What is damaged in the trainer's `final/` against the checksums it wrote there; empty when intact."""
    try:
        expected = read_checksums(str(final))
    except RegistryError as exc:
        return [str(exc)]
    return differences(checksums(str(final)), expected)


def work_dir(plan, ctx: StageContext) -> Path:
    """Where the trainer of this plan writes its checkpoints, logs and `final/` model."""
    return Path(Store(ctx.store).path(ctx.run, f"posttrain-{plan.ref.fingerprint[:12]}"))


def plan_of(inputs: dict[str, DatasetRef], cfg: PosttrainConfig, ctx: StageContext):
    """The stage's plan, fingerprinted by what is learned: the config less SPEED_ONLY, and the rank count where
    it is above one (a child trained on 8 GPUs saw batches 8 times larger than one trained on 1; one rank keeps
    the fingerprints of the runs before the count was added)."""
    config = cfg.model_dump(mode="json", exclude=SPEED_ONLY)
    if (ranks := rank_count(cfg.nproc)) > 1:
        config["ranks"] = ranks
    return make_plan(STAGE, inputs, config, ctx)


def child_of(ref: DatasetRef) -> dict:
    """The `checkpoint` row of a posttrain output: id, parent, directory and the trainer's metrics."""
    return read_row(ref, ("metrics",))
