"""The DeepSpeed training process of `tasks/posttrain`, started by torchrun (one process per rank).

It runs outside Prefect on purpose: a task timeout cannot interrupt CUDA or NCCL calls, a subprocess can be
killed. Checkpoints are safetensors + JSON only (module weights, and each rank's ZeRO partition of fp32
master weights and Adam moments and its share of the EMA), so a killed run resumes from its last checkpoint
without unpickling anything, and ends at the configured step count.

    python -m torch.distributed.run --nproc_per_node N -m tasks.posttrain_worker JOB.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from configs.schema import PosttrainConfig
from model.protocol import CPRExample
from model.schedule import warmup_cosine
from storage import DatasetRef, from_png, write_checksums
from tasks.objectives import dpo_loss, grpo_loss, sft_loss
from tasks.posttrain import TRAINS_ON
from tasks.stage import read, stable_seed

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16, for MFU
# steps of each process left out of the timed throughput (as the benches leave out theirs): the first ones
# compile the layers, tens of seconds on a GPU
WARMUP_STEPS = 2
PROFILE_ENV = "UMM_POSTTRAIN_PROFILE"  # "1": the first timed step runs under torch.profiler (the benches' --profile)
EMA_GROUP = 1 << 27  # elements per multi-tensor EMA update: few kernel launches, bounded fp32 copies


def lr_at(step: int, cfg: PosttrainConfig) -> float:
    if cfg.schedule == "constant" and step >= cfg.warmup_steps:
        return cfg.lr
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)


def load_examples(ref: dict, split: str) -> list[CPRExample]:
    rows = read(DatasetRef.model_validate(ref)).to_pylist()
    img = lambda b: from_png(b) if b is not None else None  # noqa: E731
    return [CPRExample(kind=r["kind"], input_text=r["input_text"], target_text=r["target_text"],
                       input_image=img(r["input_image"]), target_image=img(r["target_image"]),
                       rejected_image=img(r["rejected_image"]), meta=json.loads(r["meta"] or "{}"))
            for r in rows if r["split"] == split]


def drop_condition(ex: CPRExample, rng: random.Random, p: float) -> CPRExample:
    """With probability p, an image target without its prompt: it keeps the unconditional branch trained."""
    if ex.kind in ("generation", "reflection") and rng.random() < p:
        return dataclasses.replace(ex, input_text="")
    return ex


class Objective(torch.nn.Module):
    """What DeepSpeed trains: the backend's module (`TrainableModel.net`), with the objective's loss for a batch
    of examples (tasks/objectives.py: the CPR mixture, or DPO against the frozen reference)."""

    def __init__(self, umm, cfg: PosttrainConfig, reference=None):
        super().__init__()
        self.net = umm.net
        self.umm, self.cfg, self.reference = umm, cfg, reference

    def forward(self, examples: list[CPRExample]) -> torch.Tensor:
        if self.cfg.objective == "dpo":
            return dpo_loss(self.umm, self.reference, examples, beta=self.cfg.dpo_beta,
                            nll_weight=self.cfg.dpo_nll_weight)
        if self.cfg.objective == "grpo":  # the group samples; with grpo_sft_weight, CPR examples beside them
            groups = [e for e in examples if e.kind == "group"]
            rest = [e for e in examples if e.kind != "group"]
            loss = sft_loss(self.umm, rest, self.cfg.loss_weights or None) * self.cfg.grpo_sft_weight
            if groups:
                loss = loss + grpo_loss(self.umm, self.reference, groups, clip=self.cfg.grpo_clip,
                                        kl_beta=self.cfg.grpo_kl)
            return loss
        return sft_loss(self.umm, examples, self.cfg.loss_weights or None)


def freeze_parameters(net: torch.nn.Module, patterns: list[str]) -> None:
    """Keep the parameters whose names match a pattern fixed (no gradient, no optimizer state)."""
    names = [n for n, _ in net.named_parameters()]
    for pat in patterns:
        if not fnmatch.filter(names, pat):
            raise ValueError(f"posttrain.freeze: {pat!r} matches no parameter of the model "
                             f"(names look like {', '.join(names[:4])}, ...)")
    for n, p in net.named_parameters():
        if any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)


def eager():
    """Compiled layers run eagerly inside: a few no-grad held-out batches are not worth compiling another
    variant of them for (tens of seconds on a GPU, and again once the export is cast to fp32)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(umm, examples: list[CPRExample], batch: int = 64) -> dict[str, float]:
    """Mean loss per kind on held-out examples (SFT losses, also for DPO runs: they measure the same model)."""
    by_kind = defaultdict(list)
    for e in examples:
        by_kind[e.kind].append(e)
    out = {}
    umm.net.eval()
    with eager():
        for kind, exs in sorted(by_kind.items()):
            losses = [float(sft_loss(umm, exs[i:i + batch])) * len(exs[i:i + batch])
                      for i in range(0, len(exs), batch)]
            out[kind] = sum(losses) / len(exs)
    umm.net.train()
    return out


def params_on_path(umm, kind: str, cache: dict[str, int]) -> int:
    """The backend's count of parameters a token of `kind` runs through (`params_on_path`, optional); without
    one, all of its parameters."""
    if kind not in cache:
        hook = getattr(umm, "params_on_path", None)
        cache[kind] = int(hook(kind)) if hook is not None else sum(p.numel() for p in umm.net.parameters())
    return cache[kind]


def batch_work(umm, batch: list[CPRExample], path: dict[str, int]) -> tuple[int, float]:
    """(tokens, training FLOPs) of a batch: each example's tokens x 6 x the parameters on its kind's path."""
    tokens = flops = 0
    for e in batch:
        n = umm.tokens_per_example(e)
        tokens += n
        flops += 6.0 * n * params_on_path(umm, e.kind, path)
    return tokens, flops


def ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay x ema + (1 - decay) x current (in fp32), as multi-tensor kernels over groups of tensors."""
    keys, size = [], 0
    for i, k in enumerate(ema):
        keys.append(k)
        size += ema[k].numel()
        if size >= EMA_GROUP or i == len(ema) - 1:
            avg = [ema[k] for k in keys]
            torch._foreach_mul_(avg, decay)
            torch._foreach_add_(avg, [current[k].float() for k in keys], alpha=1 - decay)
            keys, size = [], 0


def ema_shard(net: torch.nn.Module, rank: int, world: int) -> list[str]:
    """The trained tensors whose EMA this rank keeps, by state-dict name: contiguous runs of the state dict's
    order, about 1/world of the trained elements each. Under ZeRO 0-2 every rank holds all the current weights,
    so each can average its own share; a full fp32 EMA on every rank would cost 4 bytes a parameter per GPU (58 GB
    for BAGEL's 14.6 B). Frozen tensors and buffers stay out: their average is themselves."""
    trained = [(n, p.numel()) for n, p in net.named_parameters(remove_duplicate=False) if p.requires_grad]
    total = sum(n for _, n in trained)
    keys, offset = [], 0
    for name, n in trained:
        if offset * world // max(total, 1) == rank:  # the share in which the tensor starts
            keys.append(name)
        offset += n
    return keys


def gather_ema(run: Run) -> dict[str, torch.Tensor] | None:
    """The whole EMA on rank 0 (on the CPU; None on the other ranks), in the state dict's order: the shares are
    contiguous runs of it, each rank sends its own. Every rank calls it."""
    import torch.distributed as dist

    if run.ema is None:
        return None
    if run.rank != 0:
        for t in run.ema.values():  # in ema_shard's order, which rank 0 receives in
            dist.send(t.contiguous(), dst=0)
        return None
    full = {k: v.cpu() for k, v in run.ema.items()}
    params = dict(run.engine.module.net.named_parameters(remove_duplicate=False))
    for owner in range(1, run.world):
        for k in ema_shard(run.engine.module.net, owner, run.world):
            buf = torch.empty(params[k].shape, dtype=torch.float32, device=run.device)
            dist.recv(buf, src=owner)
            full[k] = buf.cpu()
    return full


# --- checkpoints: safetensors + JSON ------------------------------------------------------------------
def _zero_state(engine) -> dict[str, torch.Tensor]:
    zo = engine.optimizer
    tensors = {f"fp32.{g}": t.detach().float().cpu().contiguous() for g, t in enumerate(zo.single_partition_of_fp32_groups)}
    for idx, st in zo.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"state.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return tensors


def _load_zero_state(engine, tensors: dict[str, torch.Tensor]) -> None:
    zo = engine.optimizer
    for g, t in enumerate(zo.single_partition_of_fp32_groups):
        t.data.copy_(tensors[f"fp32.{g}"].to(t.device, t.dtype))
    sd = zo.optimizer.state_dict()
    state: dict[int, dict] = defaultdict(dict)
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, k = key.split(".", 2)
            state[int(idx)][k] = v
    sd["state"] = dict(state)
    zo.optimizer.load_state_dict(sd)


def save_checkpoint(engine, ema, step: int, ckpt_root: Path, rank: int, world: int, extra: dict) -> None:
    import torch.distributed as dist

    d = ckpt_root / f"step-{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    save_file(_zero_state(engine), str(d / f"optim-rank{rank}.safetensors"))
    if ema is not None:  # this rank's share
        save_file({k: v.contiguous() for k, v in ema.items()}, str(d / f"ema-rank{rank}.safetensors"))
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in engine.module.net.state_dict().items()},
                  str(d / "model.safetensors"))
    dist.barrier()
    if rank == 0:  # state.json last: a checkpoint without it is incomplete and ignored
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps({"step": step, "world_size": world, **extra}))
        os.replace(tmp, d / "state.json")
        for old in sorted(ckpt_root.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def latest_checkpoint(ckpt_root: Path, world: int) -> tuple[Path, dict] | None:
    for d in sorted(ckpt_root.glob("step-*"), reverse=True):
        if (d / "state.json").exists():
            state = json.loads((d / "state.json").read_text())
            if state["world_size"] == world:
                return d, state
    return None


@dataclasses.dataclass
class Run:
    """One rank's training run: what setup builds, the loop advances and save exports."""

    cfg: PosttrainConfig
    out: Path
    rank: int
    world: int
    device: str
    cuda: bool
    bf16: bool
    umm: object = None
    engine: object = None
    train: list = dataclasses.field(default_factory=list)
    heldout: list = dataclasses.field(default_factory=list)
    ema: dict | None = None
    start: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


def build_ops() -> None:
    """DeepSpeed builds its CPU shared-memory op with torch's JIT, which marks a build with a lock file: a trainer
    killed while holding it (a stopped run) leaves the file behind, and every later trainer waits on it for ever.
    Trainers build under an fcntl lock, which the kernel frees with its holder, so a lock file found while holding
    it is stale. The op stays loaded in this process: DeepSpeed's own load below reuses it."""
    import fcntl

    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op
    from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT puts this op's lock file

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    build = Path(_get_build_directory(builder.NAME, verbose=False))
    with open(build.parent / ".selfplay-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            print(f"removing {stale}, left by a build that was stopped", flush=True)
            stale.unlink()
        build_shm_op()


def setup(job: dict) -> Run:
    """Distributed init, the parent model (and a frozen reference for DPO), the examples, the DeepSpeed engine."""
    import deepspeed
    import torch.distributed as dist

    from model.registry import load_trainable  # the backend is read from the checkpoint's own files

    cfg = PosttrainConfig.model_validate(job["posttrain"])
    cuda = torch.cuda.is_available()
    if not cuda:
        build_ops()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    run = Run(cfg, Path(job["out_dir"]), dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu",
              cuda, bf16)
    torch.manual_seed(cfg.seed)
    run.umm = load_trainable(job["parent_dir"], device=run.device, dtype="float32")
    reference = None
    if cfg.objective in ("dpo", "grpo"):  # a frozen reference: the parent
        reference = load_trainable(job["parent_dir"], device=run.device, dtype="float32")
        reference.net.requires_grad_(False).eval()
        if bf16:
            reference.net.to(torch.bfloat16)
    source = job[TRAINS_ON[cfg.objective]]
    run.train, run.heldout = load_examples(source, "train"), load_examples(job["cpr"], "heldout")
    if cfg.objective == "grpo" and cfg.grpo_sft_weight > 0:
        run.train += load_examples(job["cpr"], "train")
    if not run.train:
        raise SystemExit(f"posttrain: no training examples in {DatasetRef.model_validate(source).name}")
    freeze_parameters(run.umm.net, cfg.freeze)
    # speed only, through the backend's optional hook (model/protocol.py): compiled layers, a chunked loss, the
    # frozen encoders' outputs kept; the frozen reference keeps its encodings too but is not compiled
    compile_layers = cfg.compile if isinstance(cfg.compile, bool) else cuda
    for m, c in ((run.umm, compile_layers), (reference, False)):
        if m is not None and hasattr(m, "configure_training"):
            m.configure_training(compile=c, loss_chunk=cfg.loss_chunk)
    model = Objective(run.umm, cfg, reference)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cuda)
    bucket = 5e8 if cuda else 5e7  # the training bench's buckets on a GPU; CPU ranks keep their memory small
    ds_config = {"train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
                 "gradient_clipping": cfg.grad_clip, "steps_per_print": 10**9, "wall_clock_breakdown": False,
                 "zero_optimization": {"stage": cfg.zero_stage, "contiguous_gradients": True,
                                       "overlap_comm": cuda, "reduce_bucket_size": bucket,
                                       "allgather_bucket_size": bucket},
                 "bf16": {"enabled": bf16}}
    run.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return run


def resume(run: Run) -> None:
    """The EMA, and the last complete checkpoint of this world size if there is one."""
    if run.cfg.ema_decay > 0:
        # trained weights only (an integer buffer, the codebook's index tables, averaged in float and cast back
        # came out truncated and wrecked every EMA export), this rank's share of them
        current = run.engine.module.net.state_dict()
        run.ema = {k: current[k].detach().float().clone()
                   for k in ema_shard(run.engine.module.net, run.rank, run.world)}
    found = latest_checkpoint(run.out / "ckpt", run.world)
    if found is not None:
        d, run.extra = found
        run.start = run.extra["step"]
        run.engine.module.net.load_state_dict({k: v.to(run.device)
                                               for k, v in load_file(str(d / "model.safetensors")).items()})
        _load_zero_state(run.engine, load_file(str(d / f"optim-rank{run.rank}.safetensors")))
        if run.ema is not None:
            shard = d / f"ema-rank{run.rank}.safetensors"
            saved = load_file(str(shard if shard.exists() else d / "ema.safetensors"))  # before: one whole file
            run.ema = {k: saved[k].to(run.device) for k in run.ema}
        if run.rank == 0:
            print(f"[posttrain] resumed from {d.name} (step {run.start} of {run.cfg.steps})", flush=True)
    if "heldout_before" not in run.extra:
        run.extra["heldout_before"] = heldout_loss(run.umm, run.heldout) if run.heldout else {}


def train_step(run: Run, step: int) -> tuple[list, float, float]:
    """One optimizer step over the global batch (this rank's micro-batches); returns (batch, mean loss, lr)."""
    cfg, engine = run.cfg, run.engine
    lr = lr_at(step, cfg)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr
    rng = random.Random(stable_seed(cfg.seed, "batch", step))
    per_step = cfg.micro_batch * cfg.grad_accum * run.world
    batch = [drop_condition(run.train[rng.randrange(len(run.train))], rng, cfg.cfg_dropout) for _ in range(per_step)]
    losses = []
    for m in range(cfg.grad_accum):
        lo = (m * run.world + run.rank) * cfg.micro_batch
        loss = engine(batch[lo:lo + cfg.micro_batch])
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())  # read once per step: a read per micro-batch would stall the GPU queue
    if run.ema is not None:
        with torch.no_grad():
            ema_update(run.ema, engine.module.net.state_dict(), cfg.ema_decay)
    return batch, float(torch.stack(losses).float().mean()), lr


def profiled(fn, cuda: bool):
    """fn() under torch.profiler; its wall time and top kernels (the table ends with the GPU's total) go to the
    log."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        out = fn()
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    print(f"[posttrain] profiled step: wall {wall:.3f} s (the profiler's own cost included)\n{table}", flush=True)
    return out


def train(run: Run) -> dict:
    """Steps from the resumed one to the configured count, a checkpoint every `checkpoint_every`. Returns the
    loop's wall time, its checkpoint time and each step's (seconds, examples, tokens, FLOPs): a step's seconds
    are its wall time with its bookkeeping, checkpoint saves left out (a step ends reading its loss back, so its
    GPU work is done)."""
    cfg = run.cfg
    t0, ckpt_s, steps, path = time.perf_counter(), 0.0, [], {}
    profile_at = run.start + WARMUP_STEPS if os.environ.get(PROFILE_ENV) == "1" else -1
    for step in range(run.start, cfg.steps):
        ts = time.perf_counter()
        if step == profile_at and run.rank == 0:
            batch, loss, lr = profiled(lambda: train_step(run, step), run.cuda)
        else:
            batch, loss, lr = train_step(run, step)
        tokens, flops = batch_work(run.umm, batch, path)  # a DPO pair counts its chosen and its rejected sequence
        if run.rank == 0:
            with open(run.out / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr}) + "\n")
        steps.append((time.perf_counter() - ts, len(batch), tokens, flops))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            tc = time.perf_counter()
            save_checkpoint(run.engine, run.ema, step + 1, run.out / "ckpt", run.rank, run.world, run.extra)
            ckpt_s += time.perf_counter() - tc
    if run.cuda:
        torch.cuda.synchronize()
    return {"train_s": time.perf_counter() - t0, "checkpoint_s": ckpt_s, "steps": steps, "path": path,
            "untimed": WARMUP_STEPS + int(profile_at >= 0)}  # the profiled step is not timed either


def throughput(done: dict, world: int, cuda: bool) -> dict:
    """Tokens/s and MFU of the timed steps (all but each process's first WARMUP_STEPS and a profiled one, when
    there are more), and of the whole loop (`_wall`: compiling and checkpoint saves included)."""
    steps, train_s, untimed = done["steps"], done["train_s"], done.get("untimed", WARMUP_STEPS)
    timed = steps[untimed:] if len(steps) > untimed else steps
    s = sum(t[0] for t in timed)
    n_ex, n_tok, flops = (sum(t[i] for t in timed) for i in (1, 2, 3))
    all_tok, all_flops = sum(t[2] for t in steps), sum(t[3] for t in steps)
    out = {"timed_steps": len(timed), "step_s": round(s / len(timed), 4) if timed else None,
           "warmup_s": round(sum(t[0] for t in steps[:len(steps) - len(timed)]), 3),
           "checkpoint_s": round(done["checkpoint_s"], 3),
           "examples_per_s": round(n_ex / s, 2) if s > 0 else None,
           "tokens_per_s": round(n_tok / s, 1) if s > 0 else None,
           "tokens_per_s_wall": round(all_tok / train_s, 1) if train_s > 0 else None,
           "tokens": all_tok, "flops_per_token": round(all_flops / all_tok, 1) if all_tok else None,
           "params_on_path": dict(sorted(done["path"].items())),
           "step_times": [round(t[0], 3) for t in steps]}  # a slow step among fast ones: a recompile, a new shape
    if cuda and s > 0:  # MFU against the bf16 peak of every rank's GPU
        out["mfu"] = round(flops / s / (PEAK_BF16_FLOPS * world), 5)
        out["mfu_wall"] = round(all_flops / train_s / (PEAK_BF16_FLOPS * world), 5)
    return out


def save(run: Run, done: dict, ema: dict[str, torch.Tensor] | None) -> None:
    """Rank 0 exports the model (the gathered EMA, or raw) with its metrics and their checksums to `final/`,
    atomically."""
    cfg, umm, train_s = run.cfg, run.umm, done["train_s"]
    weights = ema if cfg.export == "ema" else None
    if weights is not None:
        current = umm.net.state_dict()  # buffers the EMA does not hold stay as they are
        umm.net.load_state_dict({**current, **{k: v.to(current[k].dtype) for k, v in weights.items()}})
    umm.net.float()
    umm.weights_changed()
    after = heldout_loss(umm, run.heldout) if run.heldout else {}
    n_params = sum(p.numel() for p in umm.net.parameters())
    metrics = {"steps": cfg.steps, "resumed_from": run.start, "world_size": run.world, "device": run.device,
               "precision": "bf16" if run.bf16 else "fp32", "train_s": round(train_s, 3),
               **throughput(done, run.world, run.cuda),
               "flops_count": "params_on_path" if hasattr(umm, "params_on_path") else "all_params",
               "speed": dict(getattr(umm, "train_speed", {})),
               "params": n_params, "heldout_before": run.extra["heldout_before"], "heldout_after": after,
               "objective": cfg.objective, "train_examples": len(run.train)}
    if run.cuda:
        metrics["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    final, tmp = run.out / "final", run.out / "final.tmp"
    if final.exists():
        shutil.rmtree(final)
    shutil.rmtree(tmp, ignore_errors=True)
    umm.save_pretrained(tmp)
    (tmp / "_metrics.json").write_text(json.dumps(metrics, indent=1))
    write_checksums(str(tmp))  # what is reused or registered later is checked against what was written here
    os.replace(tmp, final)  # the finished model appears at once or not at all
    print(json.dumps({"posttrain": metrics}), flush=True)


def main(job_path: str) -> None:
    import torch.distributed as dist

    from tasks.posttrain import die_with_parent

    die_with_parent()  # torchrun's death (e.g. the stage was killed) takes this rank with it
    run = setup(json.loads(Path(job_path).read_text()))
    resume(run)
    done = train(run)
    ema = gather_ema(run)
    if run.rank == 0:
        save(run, done, ema)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
