"""BAGEL-7B-MoT's shape on one GPU, random weights: rollout images/s beside the compute-bound ceiling, and DeepSpeed
post-training tokens/s and MFU at the real widths with as many layers as fit.

    python -m model.bagel.bench rollout --resolutions 512 1024 --images 4
    python -m model.bagel.bench train --layers 6 --micro-batch 2 --resolution 1024 --accum 4

Each prints one JSON line. The rollout ceiling counts the matrix products and attention of every velocity pass the
sampler actually ran (text CFG adds one pass inside the CFG interval), at `peak` TFLOP/s (790: the bf16 rate
measured on an H200); the VAE decode is timed but not counted. MFU = 6 x parameters on the path x tokens / time /
989 TFLOP/s (the H200's dense bf16 peak), as the Janus bench reports it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.bagel.config import BAGEL_7B_MOT, BagelConfig


def _pass_flops(cfg: BagelConfig, queries: int, keys: int, gen: bool = True) -> float:
    """Multiply-adds x 2 of one forward over `queries` tokens (one expert's weights) attending `keys` keys."""
    c = cfg.llm
    d, kv, inter = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * inter)
    attn = 4 * queries * keys * c.num_attention_heads * c.head_dim
    return c.num_hidden_layers * (queries * per_token + attn)


def _random_umm(cfg: BagelConfig, device: str, vae_config: dict | None = None):
    from model.bagel.modeling import BagelNet
    from model.bagel.umm import BagelUMM
    from model.bagel.vae import FLUX_VAE_CONFIG, build_vae
    from model.vlm.tiny import tiny_qwen2_tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        net = BagelNet(cfg)
    net = net.to_empty(device=device).to(dtype)
    net.init_weights()
    net.restore_rope(device)
    with torch.no_grad():
        net.llm2vae.weight.normal_(0.0, cfg.llm.initializer_range)
    vae = build_vae(vae_config or FLUX_VAE_CONFIG).to(device, dtype).eval()
    return BagelUMM(net.eval(), vae, tiny_qwen2_tokenizer())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tiny():
    """The CPU check of these benches: the tiny shape and autoencoder."""
    from model.bagel.config import TINY
    from model.bagel.vae import TINY_VAE_CONFIG

    return TINY, "cpu", TINY_VAE_CONFIG


def bench_rollout(resolutions=(512, 1024), images: int = 4, steps: int = 50, cfg_scale: float = 4.0,
                  peak_tflops: float = 790.0, tiny: bool = False, image_batch: int = 1, compile: bool = True,
                  profile_steps: bool = False) -> dict:
    shape, device, vae = _tiny() if tiny else (BAGEL_7B_MOT, "cuda", None)
    umm = _random_umm(shape, device, vae)
    umm.settings = umm.settings.model_copy(update={"image_batch": image_batch, "compile": compile})
    cfg = umm.cfg
    calls: list[tuple[int, int]] = []
    velocities = umm._velocities

    def counted(prefixes, x, t, side, memo=None):  # one (queries, keys) per branch and image: padding not counted
        for kv, _ in prefixes:
            p = 0 if kv is None else kv[0][0].shape[1]
            calls.append((x.shape[1] + 2, p + x.shape[1] + 2))
        return velocities(prefixes, x, t, side, memo=memo)

    umm._velocities = counted
    prompts = ["a photo of a red bicycle and a blue dog", "a photo of three cups on a wooden table"]
    out: dict = {"shape": "BAGEL-7B-MoT (random weights, bf16)", "steps": steps, "cfg_text": cfg_scale,
                 "image_batch": image_batch, "compile": compile,
                 "cfg_interval": [0.0, 1.0], "peak_tflops": peak_tflops,
                 "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for res in resolutions:
        sampling = {"steps": steps, "resolution": res, "cfg_interval": [0.0, 1.0]}
        # warm-up with the timed run's group size: the compiled kernels' shapes are those it will see
        k = min(image_batch, images)
        umm.generate([prompts[i % 2] for i in range(k)], list(range(k)), [cfg_scale] * k, **{**sampling, "steps": 3})
        _sync()
        calls.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            ims = umm.generate([prompts[i % 2] for i in range(images)], list(range(images)), [cfg_scale] * images,
                               **sampling)
        _sync()
        s = time.perf_counter() - t0
        flops = sum(_pass_flops(cfg, q, k) for q, k in calls) / images
        rate = images / s
        ceiling = peak_tflops * 1e12 / flops
        out[str(res)] = {"images": len(ims), "seconds": round(s, 2), "images_per_s": round(rate, 4),
                         "velocity_passes_per_image": len(calls) // images, "tflop_per_image": round(flops / 1e12, 1),
                         "achieved_tflops": round(rate * flops / 1e12, 1), "ceiling_images_per_s": round(ceiling, 4),
                         "of_ceiling": round(rate / ceiling, 3)}
        print(json.dumps({str(res): out[str(res)]}), flush=True)
        if profile_steps:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with torch.inference_mode(), prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                umm.generate([prompts[i % 2] for i in range(k)], list(range(k)), [cfg_scale] * k,
                             **{**sampling, "steps": 3})
                _sync()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70),
                  flush=True)
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def bench_train(layers: int = 6, micro_batch: int = 2, steps: int = 5, resolution: int = 1024, accum: int = 4,
                zero_stage: int = 2, compile: bool = True, latent_cache: bool = True, profile_step: bool = False,
                distinct: int = 0, tiny: bool = False) -> dict:
    """DeepSpeed (ZeRO-`zero_stage`, bf16, one GPU, fused AdamW as the posttrain worker) optimizer steps of the
    generation loss at the real widths with `layers` decoder layers, `accum` micro-batches each (UniCorn
    accumulates 4); the ViT is frozen as in the cycle. The VAE encodes each target once (`latent_cache`; off: at
    every step); `distinct` target images in all (0: one micro-batch's worth, reused), drawn in turn. The first two
    steps are not timed. `compile`: the fused norms, rotary and SiLU-multiply (`Settings.compile`); the JSON
    gives the loss of one batch with and without them (`fused_loss_rel_diff`). `profile_step`: the top CUDA kernels
    of one more optimizer step, printed."""
    import os

    import deepspeed
    from PIL import Image

    from model.bagel import vae as V
    from model.protocol import CPRExample

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    shape, device, vae = _tiny() if tiny else (BAGEL_7B_MOT, "cuda", None)
    cuda = device == "cuda"
    cfg = shape.model_copy(update={"llm": shape.llm.model_copy(update={"num_hidden_layers": layers})})
    umm = _random_umm(cfg, device, vae)
    umm.settings = umm.settings.model_copy(update={"timestep_shift": 1.0, "compile": compile,
                                                  "latent_cache_gib": 8.0 if latent_cache else 0.0})
    umm._train_side = lambda: resolution
    umm.train()
    params = [p for p in umm.net.parameters() if p.requires_grad]
    ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum,
          "bf16": {"enabled": cuda}, "zero_optimization": {"stage": zero_stage, "overlap_comm": cuda,
                                                           "contiguous_gradients": True},
          "gradient_clipping": 1.0, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
    engine, _, _, _ = deepspeed.initialize(model=umm.net, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(0)
    n_images = max(distinct, micro_batch)
    # noise images: a flat colour would let the VAE's convolutions see nothing but constants
    exs_all = [CPRExample("generation", f"a photo of {i} red cups", target_image=Image.fromarray(
        torch.randint(0, 256, (resolution, resolution, 3), generator=g, dtype=torch.uint8).numpy()))
        for i in range(n_images)]
    batches = [[exs_all[(b * micro_batch + j) % n_images] for j in range(micro_batch)]
               for b in range(max(1, n_images // micro_batch))]
    exs = batches[0]
    tokens = sum(umm.tokens_per_example(e) for e in exs_all) / n_images * micro_batch
    diff = None
    with torch.no_grad():  # the fused kernels against eager on one batch, the same noise and times
        losses = []
        for on in (True, False):
            umm.net.fuse_kernels(on)
            losses.append(float(umm._flow_errors([umm._image_context(e, resolution) for e in exs],
                                                 [e.target_image for e in exs], resolution,
                                                 torch.Generator().manual_seed(1)).mean()))
        umm.net.fuse_kernels(compile)
        diff = abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12)
        _sync()
        t0 = time.perf_counter()
        V.posterior(umm.vae, [e.target_image for e in exs])
        _sync()
        encode_s = (time.perf_counter() - t0) / len(exs)  # what a target's first sight costs, beside the step
    n_path = umm.params_on_path("generation")  # the count the posttrain worker's MFU uses
    times = []
    micro = 0

    def one_step():
        nonlocal micro
        for _ in range(accum):
            loss = umm.kind_loss("generation", batches[micro % len(batches)])
            micro += 1
            engine.backward(loss)
            engine.step()
        return loss

    for step in range(steps):
        _sync()
        t0 = time.perf_counter()
        loss = one_step()
        _sync()
        times.append(time.perf_counter() - t0)
    if profile_step:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            one_step()
            _sync()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    step_s = sum(times[2:]) / max(1, len(times[2:]))
    tokens *= accum
    total = sum(p.numel() for p in umm.net.parameters())
    return {"layers": layers, "of_layers": BAGEL_7B_MOT.llm.num_hidden_layers, "params": total,
            "trainable": sum(p.numel() for p in params), "params_on_path": n_path, "micro_batch": micro_batch,
            "resolution": resolution, "accum": accum, "tokens_per_step": tokens, "step_s": round(step_s, 3),
            "tokens_per_s": round(tokens / step_s, 1), "mfu": round(6 * n_path * tokens / step_s / 989e12, 4),
            "zero_stage": zero_stage, "loss_last": round(float(loss.detach()), 4), "compile": compile,
            "latent_cache": latent_cache, "distinct_images": n_images, "fused_loss_rel_diff": diff,
            "vae_encode_s_per_image": round(encode_s, 4), "step_times": [round(t, 3) for t in times],
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}


def profile(resolution: int = 512, layers: int = 4) -> str:
    """torch.profiler's top CUDA kernels for two sampler steps (text CFG, 7B shape) and for one generation-loss
    forward and backward at `layers` layers (plain torch, no optimizer): where the time goes."""
    from PIL import Image
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from model.protocol import CPRExample

    umm = _random_umm(BAGEL_7B_MOT, "cuda")
    tables = []
    with torch.inference_mode():
        umm.generate(["a red cup"], [0], [4.0], steps=3, resolution=resolution)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            umm.generate(["a red cup"], [0], [4.0], steps=3, resolution=resolution)
            torch.cuda.synchronize()
    tables.append(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    del umm
    torch.cuda.empty_cache()
    cfg = BAGEL_7B_MOT.model_copy(update={"llm": BAGEL_7B_MOT.llm.model_copy(update={"num_hidden_layers": layers})})
    umm = _random_umm(cfg, "cuda")
    umm._train_side = lambda: resolution
    umm.train()
    ex = [CPRExample("generation", "a red cup", target_image=Image.new("RGB", (resolution,) * 2, (200, 40, 40)))] * 2
    umm.kind_loss("generation", ex).backward()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        umm.kind_loss("generation", ex).backward()
        torch.cuda.synchronize()
    tables.append(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    return "\n".join(tables)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rollout")
    r.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    r.add_argument("--images", type=int, default=4)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (a check of the bench itself)")
    r.add_argument("--image-batch", type=int, default=1, help="images drawn at once (Settings.image_batch)")
    r.add_argument("--eager", action="store_true", help="no torch.compile'd norms / rotary / SiLU")
    r.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a 3-step draw")
    t = sub.add_parser("train")
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--micro-batch", type=int, default=2)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--resolution", type=int, default=1024)
    t.add_argument("--accum", type=int, default=4)
    t.add_argument("--eager", action="store_true", help="no torch.compile'd norms / rotary / SiLU")
    t.add_argument("--no-latent-cache", action="store_true", help="the VAE encodes every target at every step")
    t.add_argument("--distinct", type=int, default=0, help="distinct target images, drawn in turn")
    t.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one more step")
    t.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (a check of the bench itself)")
    pr = sub.add_parser("profile")
    pr.add_argument("--resolution", type=int, default=512)
    a = ap.parse_args()
    if a.what == "profile":
        print(profile(a.resolution))
        return
    if a.what == "rollout":
        print(json.dumps(bench_rollout(tuple(a.resolutions), a.images, a.steps, tiny=a.tiny,
                                       image_batch=a.image_batch, compile=not a.eager,
                                       profile_steps=a.profile)))
    else:
        print(json.dumps(bench_train(a.layers, a.micro_batch, a.steps, a.resolution, a.accum, compile=not a.eager,
                                     latent_cache=not a.no_latent_cache, profile_step=a.profile,
                                     distinct=a.distinct, tiny=a.tiny)))


if __name__ == "__main__":
    main()
