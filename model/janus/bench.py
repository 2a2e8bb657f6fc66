"""Benchmarks of the Janus backend: image-token rollouts (engine vs transformers' `generate`) and post-training.

`selfplay bench rollout --config configs/cycle/janus-pro-1b.yaml --random-weights` runs `bench_rollout`;
`python scripts/bench_janus_train.py` runs `bench_train`. Both return a JSON-able dict.
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any

import torch


def emit(result: dict, out: str | None) -> None:
    """A bench script's result: one JSON line on stdout (the last line), also written to `out` if given."""
    import json
    from pathlib import Path

    line = json.dumps(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")
    print(line, flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_section(config_path: str, overrides):
    """A recipe's `model` section, typed where pydantic is installed, else as plain YAML (a GPU machine without
    the artifact store's dependencies)."""
    import yaml

    from configs.loader import apply_overrides

    data = apply_overrides(yaml.safe_load(open(config_path)) or {}, list(overrides or []), config_path)
    m = data.get("model", {})
    if m.get("backend") != "janus":
        raise ValueError(f"{config_path}: model.backend is {m.get('backend')!r}, not 'janus'")
    try:
        from model.janus.backend import JanusSection
    except ImportError:
        return type("M", (), {"dtype": "auto", "random_weights": False, "path": None, "settings": {},
                              "janus_config": {}, **m})
    return JanusSection.model_validate(m)


def load_for_bench(config_path: str, random_weights: bool, device: str | None = None, overrides=None):
    """(the recipe's model section, the model it describes)."""
    from model.janus import JanusUMM

    m = _model_section(config_path, overrides)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if random_weights or m.random_weights:
        umm = JanusUMM.random(m.janus_config, device=dev, dtype=m.dtype, settings=m.settings)
    else:
        umm = JanusUMM.from_pretrained(m.path, device=dev, dtype=m.dtype, settings=m.settings)
    return m, umm


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    from model.world import CATEGORIES, sample_prompt

    rng = random.Random(seed)
    return [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(n)]


@torch.no_grad()
def time_engine(umm, prompts: list[str], samples: int, cfg_scale: float, batch: int, temperature: float = 1.0,
                top_k: int | None = None, decode: bool = False, reference: torch.Tensor | None = None
                ) -> tuple[dict[str, Any], torch.Tensor]:
    """The engine on every prompt x sample (seeds 0..n-1). `reference`: tokens of another engine setting for the
    same seeds; the share of equal tokens is reported."""
    P = [p for p in prompts for _ in range(samples)]
    seeds = list(range(len(P)))
    cond = [umm._gen_prefix(p) for p in P]
    uncond = [umm._gen_prefix(p, uncond=True) for p in P]
    umm.settings = umm.settings.model_copy(update={"image_batch": batch})
    t0 = time.perf_counter()
    umm.sample_codes(cond[:batch], uncond[:batch], seeds[:batch], [cfg_scale] * batch, temperature, top_k)  # capture
    _sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = umm.sample_codes(cond, uncond, seeds, [cfg_scale] * len(P), temperature, top_k)
    _sync()
    s = time.perf_counter() - t0
    eng = umm.engine
    out = {"images": len(P), "batch": batch, "attn": eng._state.attn, "kv_cache": eng.kv_cache,
           "tokens_s": round(s, 3), "images_per_s": round(len(P) / s, 2), "first_call_s": round(warm_s, 2)}
    if reference is not None:
        same = codes.cpu() == reference
        out["token_match_vs_reference"] = round(float(same.float().mean()), 4)
        out["images_identical_vs_reference"] = int(same.all(-1).sum())
    if decode:
        t0 = time.perf_counter()
        umm.decode_codes(codes)
        _sync()
        d = time.perf_counter() - t0
        out.update(decode_s=round(d, 3), images_per_s_with_decode=round(len(P) / (s + d), 2))
    again = umm.sample_codes(cond[:batch], uncond[:batch], seeds[:batch], [cfg_scale] * batch, temperature, top_k)
    out["same_seed_same_tokens"] = bool(torch.equal(again.cpu(), codes[:batch].cpu()))
    if torch.cuda.is_available():
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    umm.engine.release()
    _free()
    return out, codes.cpu()


@torch.no_grad()
def time_generate(umm, prompts: list[str], samples: int, cfg_scale: float) -> dict[str, Any]:
    """transformers' own image generation: all prompts in one call, `samples` images each (num_return_sequences)."""
    ids = [umm.gen_ids(p) for p in prompts]
    L = max(len(i) for i in ids)
    x = torch.full((len(ids), L), umm.ids.pad, dtype=torch.long)
    am = torch.zeros((len(ids), L), dtype=torch.long)
    for r, i in enumerate(ids):
        x[r, L - len(i):] = torch.tensor(i)
        am[r, L - len(i):] = 1
    x, am = x.to(umm.device), am.to(umm.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = umm.net.generate(x, attention_mask=am, generation_mode="image", guidance_scale=cfg_scale, do_sample=True,
                           num_return_sequences=samples)
    _sync()
    s = time.perf_counter() - t0
    res = {"images": int(out.shape[0]), "tokens_s": round(s, 3), "images_per_s": round(out.shape[0] / s, 2)}
    if torch.cuda.is_available():
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del out
    _free()
    return res


@torch.no_grad()
def compare_with_generate(umm, prompts: list[str], seeds: list[int], cfg_scale: float = 5.0,
                          top_k: int | None = 50) -> dict[str, Any]:
    """The engine's exact sampler (batched) against `generate` on each prompt alone after torch.manual_seed(seed).
    (transformers' generate applies its default top_k=50, so the engine is given the same.)"""
    cond = [umm._gen_prefix(p) for p in prompts]
    uncond = [umm._gen_prefix(p, uncond=True) for p in prompts]
    eng = umm.engine.sample(cond, uncond, seeds, [cfg_scale] * len(prompts), 1.0, top_k, sampler="torch").cpu()
    umm.engine.release()
    rows = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        x = torch.tensor([umm.gen_ids(p)], device=umm.device)
        torch.manual_seed(s)
        ref = umm.net.generate(x, attention_mask=torch.ones_like(x), generation_mode="image",
                               guidance_scale=cfg_scale, do_sample=True, top_k=top_k).cpu()[0]
        same = (eng[i] == ref)
        first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
        rows.append({"equal": bool(same.all()), "match": round(float(same.float().mean()), 4),
                     "first_difference_at": first_diff})
    _free()
    return {"prompts": len(prompts), "all_equal": all(r["equal"] for r in rows), "per_prompt": rows}


def bench_rollout(config: str, random_weights: bool = True, prompts: int = 32, samples: int = 8,
                  cfg_scale: float = 5.0, batches: tuple[int, ...] = (256,), generate: bool = True,
                  compare: int = 0, decode: bool = True, overrides=None, fp8: bool = True) -> dict[str, Any]:
    """The engine as configured (`images_per_s`: its best batch), `generate` on the same prompts, and (fp8) the
    opt-in fp8 KV cache at the first batch, with the share of its tokens equal to the configured engine's."""
    cfg, umm = load_for_bench(config, random_weights, overrides=overrides)
    ps = bench_prompts(prompts)
    res: dict[str, Any] = {"config": config, "random_weights": bool(random_weights or cfg.random_weights),
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "dtype": str(umm.dtype).replace("torch.", ""), "params": umm.num_params(),
                           "prompts": prompts, "samples_per_prompt": samples, "cfg_scale": cfg_scale,
                           "tokens_per_image": umm.n_image_tokens, "sampler": umm.settings.sampler,
                           "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    runs, first = [], None
    for i, b in enumerate(batches):
        try:
            r, codes = time_engine(umm, ps, samples, cfg_scale, b, decode=decode and i == 0)
            runs.append(r)
            first = codes if first is None else first
        except torch.OutOfMemoryError as exc:  # a batch too large for this GPU: say so, try the next
            umm.engine.release()
            _free()
            runs.append({"batch": b, "images_per_s": 0.0, "error": f"out of memory: {str(exc)[:120]}"})
    best = max(runs, key=lambda r: r["images_per_s"])
    res["engine"] = runs
    res["images_per_s"] = best["images_per_s"]
    if fp8 and first is not None and umm.engine.kv_cache != "fp8":
        umm.engine.kv_cache = "fp8"
        try:
            res["engine_fp8_kv"] = time_engine(umm, ps, samples, cfg_scale, runs[0]["batch"], reference=first)[0]
        finally:
            umm.engine.kv_cache = "model"
    if generate:
        res["generate"] = time_generate(umm, ps, samples, cfg_scale)
        res["generate_images_per_s"] = res["generate"]["images_per_s"]
        res["speedup"] = round(res["images_per_s"] / res["generate_images_per_s"], 2)
    if compare:
        res["vs_generate"] = compare_with_generate(umm, ps[:compare], list(range(1000, 1000 + compare)), cfg_scale)
    return res


# ---------------------------------------------------------------------- post-training
def params_on_path(umm) -> int:
    """Parameters a text-to-image token passes through (JanusUMM.params_on_path, which the posttrain worker's MFU
    counts too): the Llama layers and final norm, the generation aligner and head."""
    return umm.params_on_path("generation")


class T2IStep(torch.nn.Module):
    """The text-to-image loss of JanusUMM on token tensors (prompt ids (B, P), codes (B, N)): what DeepSpeed trains."""

    def __init__(self, umm, ce_chunk: int = 0):
        super().__init__()
        self.net = umm.net
        self.umm = umm
        self.ce_chunk = ce_chunk

    def forward(self, prompt_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        emb = self.net.get_input_embeddings()(prompt_ids)
        return self.umm.image_ce(list(emb), codes, self.ce_chunk)


def _init_one_rank() -> bool:
    """torch.distributed for a one-process DeepSpeed run (NCCL on a GPU, else gloo); whether CUDA is there."""
    import os

    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return cuda


def _setup_train_engine(config: str, overrides, cuda: bool, micro_batch: int, zero_stage: int,
                        compile_layers: bool, ce_chunk: int, ds_overrides: list[str] | None):
    """(umm, DeepSpeed engine, trainable params): the random-weight JanusUMM in fp32 behind T2IStep, AdamW,
    a ZeRO config of `zero_stage` with `ds_overrides` applied."""
    import deepspeed

    from configs.loader import apply_overrides

    _, umm = load_for_bench(config, True, overrides=[*(overrides or []), "model.dtype=float32"])
    umm.net.train()
    if compile_layers:
        for layer in umm.net.model.language_model.layers:
            layer.compile()
    model = T2IStep(umm, ce_chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
    ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "steps_per_print": 10**9, "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True,
                                                          "overlap_comm": cuda, "reduce_bucket_size": 5e8,
                                                          "allgather_bucket_size": 5e8},
          "bf16": {"enabled": cuda}}
    apply_overrides(ds, list(ds_overrides or []), "--ds")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return umm, engine, params


def _time_train_steps(umm, engine, micro_batch: int, prompt_tokens: int, warmup: int, steps: int):
    """Run warmup + steps training steps on random tokens; for the timed ones (times, (forward, backward,
    optimizer) parts, losses)."""
    dev = engine.device
    N, V = umm.n_image_tokens, umm.net.config.vq_config.num_embeddings
    g = torch.Generator().manual_seed(0)
    vocab = umm.net.config.text_config.vocab_size
    times, parts, losses = [], [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, min(vocab, 256), (micro_batch, prompt_tokens), generator=g).to(dev)
        codes = torch.randint(0, V, (micro_batch, N), generator=g).to(dev)
        _sync()
        t0 = time.perf_counter()
        loss = engine(ids, codes)
        _sync()
        t1 = time.perf_counter()
        engine.backward(loss)
        _sync()
        t2 = time.perf_counter()
        engine.step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            losses.append(float(loss))
    return times, parts, losses


def bench_train(config: str = "configs/cycle/janus-pro-1b.yaml", micro_batch: int = 32, steps: int = 10,
                warmup: int = 3, prompt_tokens: int = 32, zero_stage: int = 2, compile_layers: bool = False,
                ce_chunk: int = 0, ds_overrides: list[str] | None = None, overrides=None) -> dict[str, Any]:
    """DeepSpeed ZeRO bf16 text-to-image training steps of the configured shape on one GPU, random weights.

    ce_chunk: JanusUMM.image_ce's chunked head + cross-entropy; ds_overrides: DeepSpeed config overrides in the
    recipes' `dotted.key=value` syntax (e.g. "zero_optimization.overlap_comm=false"). The step is timed whole
    and in its three parts (forward, backward, optimizer step: synchronised after each)."""
    cuda = _init_one_rank()
    umm, engine, params = _setup_train_engine(config, overrides, cuda, micro_batch, zero_stage, compile_layers,
                                              ce_chunk, ds_overrides)
    times, parts, losses = _time_train_steps(umm, engine, micro_batch, prompt_tokens, warmup, steps)
    N = umm.n_image_tokens
    step_s = sum(times) / len(times)
    tokens = micro_batch * (prompt_tokens + N)
    n_path = params_on_path(umm)
    res = {"config": config, "device": torch.cuda.get_device_name() if cuda else "cpu", "zero_stage": zero_stage,
           "precision": "bf16" if cuda else "fp32", "micro_batch": micro_batch,
           "tokens_per_example": prompt_tokens + N, "steps_timed": steps, "step_s": round(step_s, 4),
           "tokens_per_s": round(tokens / step_s, 1), "params_total": umm.num_params(),
           "params_trainable": sum(p.numel() for p in params), "params_on_path": n_path,
           "mfu": round(6 * n_path * tokens / step_s / 989e12, 4), "loss_first": round(losses[0], 4),
           "loss_last": round(losses[-1], 4), "compile_layers": compile_layers, "ce_chunk": ce_chunk,
           "ds_overrides": list(ds_overrides or []),
           "forward_s": round(sum(p[0] for p in parts) / len(parts), 4),
           "backward_s": round(sum(p[1] for p in parts) / len(parts), 4),
           "optimizer_s": round(sum(p[2] for p in parts) / len(parts), 4),
           "attn_implementation": umm.net.config.text_config._attn_implementation}
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return res


if __name__ == "__main__":  # python -m model.janus.bench CONFIG [--no-generate] [--compare N] [--batch N ...]
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--compare", type=int, default=0)
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 KV cache run")
    a = ap.parse_args()
    print(json.dumps(bench_rollout(a.config, True, a.prompts, a.samples, a.cfg_scale, tuple(a.batch or [256]),
                                   not a.no_generate, a.compare, fp8=not a.no_fp8)), flush=True)
