"""CLI commands of the embedded model: `selfplay model eval`, and `selfplay bench rollout` for it.

Registered from flows/cli.py; heavy imports happen inside the commands so the CLI starts fast.
"""

from __future__ import annotations

import os

# GNU OpenMP threads spin while waiting; on a 2-core box shared with another busy process that made decoding
# ~10x slower than one thread (5.8 vs 77 images/s measured). Passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from typing import Optional

import typer

model_app = typer.Typer(help="The embedded model: evaluation against the world's oracle.", no_args_is_help=True)


def _load(checkpoint: Optional[str], threads: Optional[int]):
    import torch
    from model.embedded import EmbeddedBackendConfig, load_embedded
    if threads:
        torch.set_num_threads(threads)
    cfg = EmbeddedBackendConfig() if checkpoint is None else EmbeddedBackendConfig(checkpoint=checkpoint)
    return load_embedded(cfg)


@model_app.command("eval")
def model_eval(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="checkpoint directory (default: the base)"),
    prompts: int = typer.Option(500, "--prompts", help="held-out prompts, spread evenly over the categories"),
    seed: int = typer.Option(20261122, "--seed", help="seed of the held-out prompt set and of sampling"),
    samples: int = typer.Option(1, "--samples", help="images per prompt"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Oracle metrics of a checkpoint; the last line is JSON."""
    from model.embedded.evaluate import evaluate
    m = _load(checkpoint, threads)
    res = evaluate(m, n_prompts=prompts, seed=seed, samples=samples, cfg_scale=cfg_scale,
                   temperature=temperature, top_k=top_k)
    print(json.dumps(res))


def bench_rollout(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint"),
    prompts: int = typer.Option(64, "--prompts"),
    samples: int = typer.Option(8, "--samples", help="images per prompt (CFG swept over linspace(3, 8, n))"),
    threads: int = typer.Option(2, "--threads", help="torch threads (the CPU budget)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="prompts per decoding batch"),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="also time the model's own judge"),
    cfg_min: float = typer.Option(3.0, "--cfg-min", help="CFG sweep start (UniCorn: 3)"),
    cfg_max: float = typer.Option(8.0, "--cfg-max", help="CFG sweep end (UniCorn: 8)"),
    no_cfg: bool = typer.Option(True, "--no-cfg/--skip-no-cfg", help="also time sampling without CFG (scale 1)"),
) -> None:
    """Sampling throughput of the embedded model on this machine; prints JSON with images_per_s."""
    import random
    import time

    import numpy as np
    import torch

    from model.world import CATEGORIES, sample_prompt
    m = _load(checkpoint, threads)
    if batch_size:
        m.config = m.config.model_copy(update={"sampling": m.config.sampling.model_copy(
            update={"batch_size": batch_size})})
    rng = random.Random(0)
    ps = [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(prompts)]
    scales = np.linspace(cfg_min, cfg_max, samples).tolist()
    P = [p for p in ps for _ in range(samples)]
    C = [scales[i % samples] for i in range(len(P))]
    S = list(range(len(P)))
    m.generate(P[:16], S[:16], C[:16])  # warm-up
    t = time.perf_counter()
    imgs = m.generate(P, S, C, temperature=1.0)
    gen_s = time.perf_counter() - t
    out = {"images_per_s": round(len(P) / gen_s, 1), "images": len(P), "gen_s": round(gen_s, 3),
           "prompts": prompts, "samples_per_prompt": samples, "cfg_scales": [round(x, 3) for x in scales],
           "temperature": 1.0, "image_size": m.config.image_size, "tokens_per_image": m.codebook.tokens_per_image,
           "batch_size": m.config.sampling.batch_size, "threads": torch.get_num_threads(),
           "params": m.num_params(), "device": str(m.device), "checkpoint_id": m.model_id}
    if no_cfg:  # CFG doubles the decoding batch; scale 1 skips the unconditional rows
        t = time.perf_counter()
        imgs = m.generate(P, S, [1.0] * len(P), temperature=m.config.sampling.temperature)
        out["images_per_s_no_cfg"] = round(len(P) / (time.perf_counter() - t), 1)
    if judge:
        t = time.perf_counter()
        js = m.judge(P, imgs)
        judge_s = time.perf_counter() - t
        out.update({"judge_images_per_s": round(len(P) / judge_s, 1), "judge_s": round(judge_s, 3),
                    "judge_parse_ok": sum(j.parse_ok for j in js)})
    print(json.dumps(out))


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    # `selfplay bench rollout` is registered in flows/cli.py: it hands a non-Janus recipe to bench_rollout here
