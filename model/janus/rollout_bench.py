"""The rollout engine's step versions side by side in one process, with what limits them (issue 20).

    python -m model.janus.rollout_bench configs/cycle/janus-pro-1b.yaml --out runs/bench/rollout_1b.json \\
        --engines v1,v2,v2-fp8 --sweep --fidelity 16 --profile --calibrate --generate
    python -m model.janus.rollout_bench --shape7b --out runs/bench/rollout_7b.json --sweep --generate

Random weights of the recipe's shapes. In order, each stage in its own try (a failure is recorded in the JSON and
the next stage runs) and the JSON rewritten after each stage (a run cut short keeps what it measured):
- `peak`: the GPU's read bandwidth measured here (a bf16 tensor of 8 GiB summed), and the bandwidth ceilings of a
  decoding step: (KV-cache bytes + weight bytes) per step at that bandwidth, as images/s;
- `sweep`: decode attention alone on one layer's cache at the batch's real shape (its left padding and shared
  prefixes) at the mean cache length: v1's kernel and v2's launch configurations, bf16 and fp8; the fastest v2
  configuration of each format is what the v2 engines use (unless --no-tune);
- `engines`: each engine (v1: today's step, bf16 cache; v2; v2-fp8) timed on every prompt x sample after a first
  call that compiles and captures (the same tokens on both calls: `same_seed_same_tokens`); achieved cache-read
  bandwidth = KV bytes per step / step time; then teacher-forced over the first engine's tokens (`--fidelity N`:
  the first N samples' guided next-token logits at every step; for the others KL(first || this) and top-1
  agreement); v2 is also timed with prefix sharing off (same graphs, rows read their own prefix copies);
- `calibration` (--calibrate): v1 without torch.compile, teacher-forced: the KL of the same step rounded
  differently in bf16 (Inductor's fusions vs eager), the scale against which "matches to bf16 rounding" is read;
- `profile` (--profile): GPU time per kernel of a few decoding steps at the mean cache length (run eagerly, outside
  the CUDA graphs: the kernels are the graphs' kernels), per engine;
- `generate` (--generate, run before the sweep): transformers' `generate` on the same prompts and samples.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from model.janus import decode_attn as D
from model.janus.bench import _free, _sync, bench_prompts, load_for_bench, time_generate
from model.janus.rollout import ImageRollout

CONFIG_7B = "configs/cycle/janus-pro-7b.yaml"
PEAK_REF_TBPS = 4.24  # issue 20: an 8 GiB bf16 read on the H200 this was written for

SWEEP = {  # v2 launch configurations tried by --sweep: (block_n, warps, stages, splits, dot, prefetch)
    False: [D.Config(32, 1, 1, 1, False, False), D.Config(32, 2, 1, 1, False, True),
            D.Config(64, 4, 1, 1, False, True), D.Config(32, 4, 3, 1, True), D.Config(64, 4, 2, 1, True),
            D.Config(64, 4, 3, 1, True), D.Config(64, 4, 4, 1, True), D.Config(128, 4, 2, 1, True),
            D.Config(128, 8, 3, 1, True), D.Config(64, 4, 3, 2, True), D.Config(64, 4, 3, 4, True),
            D.Config(128, 4, 3, 1, True), D.Config(64, 8, 3, 1, True), D.Config(64, 4, 5, 1, True),
            D.Config(32, 4, 4, 1, True), D.Config(64, 2, 3, 1, True), D.Config(32, 1, 2, 1, False, False),
            D.Config(32, 1, 3, 1, False, False), D.Config(32, 2, 3, 1, False, False)],
    True: [D.Config(32, 1, 1, 1, False, False), D.Config(32, 2, 1, 1, False, True),
           D.Config(64, 4, 1, 1, False, True), D.Config(64, 4, 3, 1, True), D.Config(128, 4, 2, 1, True),
           D.Config(128, 4, 3, 1, True), D.Config(128, 8, 3, 1, True), D.Config(256, 8, 2, 1, True),
           D.Config(128, 4, 3, 2, True), D.Config(128, 4, 3, 4, True), D.Config(64, 4, 4, 1, True),
           D.Config(128, 4, 4, 1, True), D.Config(256, 8, 3, 1, True), D.Config(64, 2, 3, 1, True),
           D.Config(32, 1, 2, 1, False, False), D.Config(32, 1, 3, 1, False, False),
           D.Config(32, 1, 4, 1, False, False), D.Config(16, 1, 3, 1, False, False),
           D.Config(64, 1, 3, 1, False, False), D.Config(64, 2, 3, 1, False, False)],
}


def median_seconds(fn, iters: int = 20, warm: int = 3) -> float:
    """Median seconds of fn() on the GPU (CUDA events; on a CPU, wall time)."""
    for _ in range(warm):
        fn()
    ts = []
    if not torch.cuda.is_available():  # CPU (the tests): wall time
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


class Batch:
    """The bench's rows as the engine lays them out: prefixes, left padding, shared prefixes, cache shape."""

    def __init__(self, umm, prompts: list[str], samples: int, batch: int):
        self.P = [p for p in prompts for _ in range(samples)]
        self.seeds = list(range(len(self.P)))
        self.cond = [umm._gen_prefix(p) for p in self.P]
        self.uncond = [umm._gen_prefix(p, uncond=True) for p in self.P]
        self.batch = min(batch, len(self.P))
        rows = self.cond[:self.batch] + self.uncond[:self.batch]  # the first engine call's rows
        pad = 16  # JanusUMM.sample_codes' pad_to on a GPU
        self.L = int(math.ceil(max(r.shape[0] for r in rows) / pad)) * pad
        x = torch.zeros(len(rows), self.L, rows[0].shape[1], device=rows[0].device, dtype=rows[0].dtype)
        keym = torch.zeros(len(rows), self.L, dtype=torch.bool, device=x.device)
        for i, r in enumerate(rows):
            x[i, self.L - r.shape[0]:] = r
            keym[i, self.L - r.shape[0]:] = True
        self.start = (self.L - keym.sum(-1)).to(torch.int32)
        self.prow = ImageRollout.prefix_groups(x, keym).to(torch.int32)
        del x
        tc = umm.net.config.text_config
        self.R, self.nl, self.H = len(rows), tc.num_hidden_layers, tc.num_attention_heads
        self.KVH = tc.num_key_value_heads or self.H
        self.hd = getattr(tc, "head_dim", None) or tc.hidden_size // self.H
        self.n = umm.n_image_tokens
        self.S = self.L + self.n

    def slots_per_step(self) -> dict[str, float]:
        """Mean over the decoding steps (slot = L + t - 1 cached slots at step t) of the slots read per layer and
        KV head, summed over rows: by v1 (every slot from 0), by v2 as requested (from each row's start), by v2
        from DRAM (a shared prefix counted once)."""
        starts = self.start.long().tolist()
        prefix_unique = sum(self.L - s for r, s in enumerate(starts) if int(self.prow[r]) == r)
        ts = range(1, self.n)
        v1 = sum(self.R * (self.L + t - 1) for t in ts) / len(ts)
        req = sum(sum(self.L + t - 1 - s for s in starts) for t in ts) / len(ts)
        uniq = sum(self.R * (t - 1) + prefix_unique for t in ts) / len(ts)
        return {"v1": v1, "v2_requested": req, "v2_unique": uniq}

    def kv_bytes(self, slots: float, fp8: bool) -> float:
        """K and V bytes of `slots` (all layers, KV heads), with fp8's per-slot fp32 scales."""
        per_slot = 2 * (self.hd * (1 if fp8 else 2) + (4 if fp8 else 0))
        return slots * self.nl * self.KVH * per_slot


def weight_bytes_per_step(umm) -> int:
    """Bytes of the weights a decoding step reads: the Llama layers and final norm, the generation aligner and
    head (the image-token embedding is a lookup of a few rows)."""
    m = umm.net.model
    mods = [m.language_model.layers, m.language_model.norm, m.generation_aligner, m.generation_head]
    return sum(p.numel() * p.element_size() for mod in mods for p in mod.parameters())


def measure_peak() -> dict[str, Any]:
    """Read bandwidth of this GPU: an 8 GiB bf16 tensor summed (a read-only reduction), best of 5."""
    x = torch.ones(4 * 2**30, device="cuda", dtype=torch.bfloat16)
    t = median_seconds(lambda: x.sum(dtype=torch.float32), iters=5, warm=2)
    return {"read_8GiB_bf16_TBps": round(8 * 2**30 / t / 1e12, 3), "reference_TBps": PEAK_REF_TBPS}


def ceilings(b: Batch, weight_bytes: float, peak: float) -> dict[str, Any]:
    """images/s if a decoding step took only its bytes at `peak` B/s: KV (v1 accounting: every slot; v2: shared
    prefixes once, no padding) plus the weights, bf16 and fp8 caches."""
    sl = b.slots_per_step()
    out = {"weight_GB_per_step": round(weight_bytes / 1e9, 3)}
    for name, slots, fp8 in (("bf16_all_slots", sl["v1"], False), ("bf16_v2_unique", sl["v2_unique"], False),
                             ("fp8_v2_unique", sl["v2_unique"], True)):
        step = (b.kv_bytes(slots, fp8) + weight_bytes) / peak
        out[name] = {"kv_GB_per_step": round(b.kv_bytes(slots, fp8) / 1e9, 2), "step_ms": round(step * 1e3, 3),
                     "images_per_s": round(b.batch / ((b.n - 1) * step), 1)}
    return out


@torch.no_grad()
def sweep(b: Batch, configs: dict, peak: float) -> dict[str, Any]:
    """Decode attention on one layer's cache at the batch's shape, at the mean cache length."""
    torch.manual_seed(0)
    dev = "cuda"
    n = b.L + b.n // 2  # cached slots at the middle step
    q = torch.randn(b.R, b.H, 1, b.hd, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b.R, b.KVH, b.S, b.hd, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kn, vn = k[:, :, n:n + 1], v[:, :, n:n + 1]
    slot = torch.tensor([n], device=dev)
    plen = torch.tensor([b.L], device=dev, dtype=torch.int32)
    start, prow = b.start.to(dev), b.prow.to(dev)
    mask = (torch.arange(b.S, device=dev)[None, :] >= start[:, None].long())
    scale = 1 / math.sqrt(b.hd)
    starts = start.long().tolist()
    req_slots = sum(n - s for s in starts)
    uniq_slots = b.R * (n - b.L) + sum(b.L - s for r, s in enumerate(starts) if int(prow[r]) == r)
    out: dict[str, Any] = {"rows": b.R, "heads": b.H, "head_dim": b.hd, "cached_slots": n, "runs": []}
    for fp8 in (False, True):
        (kq, ks), (vq, vs) = (D.quantize_fp8(k), D.quantize_fp8(v)) if fp8 else ((k, None), (v, None))
        sc = (ks, vs) if fp8 else ()
        per = b.KVH * 2 * (b.hd * (1 if fp8 else 2) + (4 if fp8 else 0))  # bytes per slot of one layer

        def row(name, fn, slots_read, config=None):
            try:
                t = median_seconds(fn)
            except Exception as exc:  # noqa: BLE001 - a configuration the compiler refuses (resources)
                out["runs"].append({"kernel": name, "fp8": fp8, "config": config, "error": str(exc)[:200]})
                return
            out["runs"].append({"kernel": name, "fp8": fp8, "config": config, "us": round(t * 1e6, 1),
                                "TBps_requested": round(slots_read * per / t / 1e12, 3),
                                "TBps_unique": round(uniq_slots * per / t / 1e12, 3),
                                "of_peak_requested": round(slots_read * per / t / peak, 3)})

        ref = D.decode_attention_ref(q, kq, vq, mask, n, scale, kn, vn, *sc).float()
        row("v1", lambda: D.decode_attention(q, kq, vq, mask, slot, scale, kn, vn, *sc), b.R * n,
            list(D.CONFIGS[fp8]))
        for c in configs[fp8]:
            fn = (lambda c=c: D.decode_attention_v2(q, kq, vq, start, prow, plen, slot, scale, kn, vn, *sc,
                                                    config=c))
            # v2 reads a prefix from its row's prefix row: compare with the reference where they are equal
            try:
                got = fn().float()
                same = prow.long() == torch.arange(b.R, device=dev)
                err = float((got[same] - ref[same]).abs().max())
            except Exception as exc:  # noqa: BLE001
                out["runs"].append({"kernel": "v2", "fp8": fp8, "config": list(c), "error": str(exc)[:200]})
                continue
            row("v2", fn, req_slots, list(c))
            if "us" in out["runs"][-1]:
                out["runs"][-1]["max_err_vs_fp32_ref"] = round(err, 5)
    best = {}
    for fp8 in (False, True):
        ok = [r for r in out["runs"] if r["kernel"] == "v2" and r["fp8"] == fp8 and "us" in r
              and r.get("max_err_vs_fp32_ref", 1) < 0.05]
        if ok:
            best["fp8" if fp8 else "bf16"] = min(ok, key=lambda r: r["us"])
    out["best"] = best
    v1 = {("fp8" if r["fp8"] else "bf16"): r for r in out["runs"] if r["kernel"] == "v1" and "us" in r}
    out["v1"] = v1
    return out


@torch.no_grad()
def fidelity(ref: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Per-step KL(ref || other) of the next-token distributions and top-1 agreement; ref, other (N, T, V)."""
    kls, tops = [], []
    for i in range(ref.shape[0]):  # fp64: KLs near the bf16 rounding floor are tiny differences of logs
        lp, lq = torch.log_softmax(ref[i].double(), -1), torch.log_softmax(other[i].double(), -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
        tops.append((ref[i].argmax(-1) == other[i].argmax(-1)).float())
    kl, top = torch.stack(kls), torch.stack(tops)  # (N, T)
    q = [kl[:, s].mean().item() for s in torch.arange(kl.shape[1]).chunk(4)]
    return {"samples": ref.shape[0], "steps": ref.shape[1], "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "kl_p99": kl.flatten().quantile(0.99).item(), "kl_mean_by_quarter": q,
            "top1_agreement": round(top.mean().item(), 5),
            "top1_by_quarter": [round(top[:, s].mean().item(), 5) for s in torch.arange(top.shape[1]).chunk(4)],
            "logit_max_abs_diff": (ref - other).abs().max().item()}


@torch.no_grad()
def profile_steps(eng: ImageRollout, steps: int = 3, rows: int = 25) -> dict[str, Any]:
    """GPU time per kernel of `steps` decoding steps at the mean cache length, run eagerly on the engine's state
    (the cache holds the last rollout; only the counters are set)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    st = eng._state
    st.cap = st.cap_rows = None  # no teacher-forcing capture in the profiled steps
    mid = eng.n_tokens // 2
    st.slot.fill_(st.L + mid - 1)
    st.step.fill_(mid)
    st.pos.add_(mid - eng.n_tokens)  # positions move with the slot; their values do not change the kernels
    cfg = st.R == 2 * st.B
    eng._decode_step(st, st.S, "hash", None, cfg, None)  # warm
    _sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng._decode_step(st, st.S, "hash", None, cfg, None)
        _sync()
    # GPU kernels and their time (on CPU, the tests: operators and their own CPU time)
    us = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    avg = prof.key_averages()
    ev = [e for e in avg if us(e) > 0 and (not cuda or "CUDA" in str(getattr(e, "device_type", "CUDA")))]
    ev.sort(key=lambda e: -us(e))
    total = sum(us(e) for e in ev)
    table = [{"kernel": e.key[:100], "calls_per_step": round(e.count / steps, 2),
              "us_per_step": round(us(e) / steps, 1), "share": round(us(e) / total, 4)} for e in ev[:rows]]
    text = "\n".join([f"{'us/step':>9} {'share':>6} {'calls':>6}  kernel"] +
                     [f"{t['us_per_step']:>9.1f} {t['share']:>6.3f} {t['calls_per_step']:>6.1f}  {t['kernel']}"
                      for t in table] + [f"{total / steps:>9.1f} {'1':>6}         total GPU time per step"])
    attn = sum(us(e) for e in ev if "decode" in e.key or "combine" in e.key)  # the attention kernels (Triton's)
    return {"steps": steps, "cached_slots": st.L + mid - 1, "gpu_us_per_step": round(total / steps, 1),
            "attention_us_per_step": round(attn / steps, 1), "rest_us_per_step": round((total - attn) / steps, 1),
            "kernels": table, "table": text}


class Bench:
    def __init__(self, args):
        self.a = args
        self.res: dict[str, Any] = {"argv": vars(args), "stages": {}}
        self.out = Path(args.out) if args.out else None

    def save(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.res, indent=1, default=str) + "\n")

    def stage(self, name: str, fn) -> Any:
        t0 = time.perf_counter()
        print(f"[rollout_bench] {name} ...", flush=True)
        try:
            val = fn()
            self.res["stages"][name] = {"s": round(time.perf_counter() - t0, 1)}
            return val
        except Exception as exc:  # noqa: BLE001 - record, go on with the next stage
            traceback.print_exc()
            self.res["stages"][name] = {"s": round(time.perf_counter() - t0, 1),
                                        "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            return None
        finally:
            print(f"[rollout_bench] {name}: {self.res['stages'][name]}", flush=True)
            self.save()


@torch.no_grad()
def run_engine(bn: Bench, umm, b: Batch, name: str, config, ref: dict, peak: float) -> None:
    """Time one engine, then teacher-force it over the reference tokens; results under res['engines'][name]."""
    a = bn.a
    impl, fp8 = name.split("-")[0], name.endswith("fp8")
    eng = ImageRollout(umm.net, impl=impl, kv_cache="fp8" if fp8 else "model", config=config if impl == "v2"
                       else None)
    umm._engine = eng
    umm.settings = umm.settings.model_copy(update={"image_batch": b.batch})
    r: dict[str, Any] = {"impl": impl, "kv_cache": eng.kv_cache,
                         "config": list(config) if config and impl == "v2" else None}
    bn.res.setdefault("engines", {})[name] = r
    sc = [a.cfg_scale] * len(b.P)

    def timed(tag: str):
        _sync()
        t0 = time.perf_counter()
        codes = umm.sample_codes(b.cond, b.uncond, b.seeds, sc, 1.0, None)
        _sync()
        return codes, time.perf_counter() - t0

    warm, r["first_call_s"] = timed("warm")  # compiles, captures the graphs, and samples every image
    bn.save()
    codes, s = timed("timed")
    step = s / (len(b.P) / b.batch) / b.n
    sl = b.slots_per_step()
    r.update(images=len(b.P), batch=b.batch, attn=eng._state.attn, seconds=round(s, 3),
             images_per_s=round(len(b.P) / s, 2), step_ms=round(step * 1e3, 3),
             same_seed_same_tokens=bool(torch.equal(warm, codes)))
    kv = b.kv_bytes(sl["v1" if impl == "v1" else "v2_requested"], fp8)
    r["kv_GB_per_step_requested"] = round(kv / 1e9, 2)
    r["cache_read_TBps_requested"] = round(kv / step / 1e12, 3)
    uq = b.kv_bytes(sl["v2_unique"], fp8)  # each distinct prefix once, no padding
    if impl == "v2":
        r["kv_GB_per_step_unique"] = round(uq / 1e9, 2)
        r["cache_read_TBps_unique"] = round(uq / step / 1e12, 3)
    r["of_peak_requested"] = round(kv / step / peak, 3)
    if "tokens" in ref:
        same = codes.cpu() == ref["tokens"]
        r["token_match_vs_first_engine"] = round(float(same.float().mean()), 4)
        r["images_identical_vs_first_engine"] = int(same.all(-1).sum())
    if torch.cuda.is_available():
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    bn.save()
    if impl == "v2" and not a.no_share_run:  # the same graphs, every row reading its own prefix copy
        eng.share_prefix = False
        codes_own, s_own = timed("own prefixes")
        eng.share_prefix = True
        r["no_prefix_sharing"] = {"images_per_s": round(len(b.P) / s_own, 2),
                                  "same_tokens_as_shared": bool(torch.equal(codes_own, codes))}
        bn.save()
    if "tokens" not in ref:
        ref["tokens"] = codes.cpu()
    if a.fidelity:
        B = b.batch
        forced = ref["tokens"][:B]
        got = eng.sample(b.cond[:B], b.uncond[:B], b.seeds[:B], sc[:B], 1.0, None, pad_to=16, force=forced,
                         capture=a.fidelity)
        logits = eng.captured_logits
        eng.captured_logits = None
        if "logits" not in ref:
            ref["logits"] = logits
            r["teacher_forced_own_tokens_reproduced"] = bool(torch.equal(got.cpu(), forced))
            r["fidelity"] = "reference"
        else:
            r["fidelity"] = fidelity(ref["logits"], logits)
        del logits
        bn.save()
    if a.profile:
        try:
            r["profile"] = profile_steps(eng)
            print(f"[rollout_bench] profile of {name}:\n{r['profile']['table']}", flush=True)
            r["profile"]["gpu_busy_share_of_graph_step"] = round(r["profile"]["gpu_us_per_step"] / 1e6 / step, 3)
            # the step's other kernels as measured, plus each distinct cache byte read once at the measured peak
            bound = r["profile"]["rest_us_per_step"] / 1e6 + uq / peak
            r["bound_measured_rest_plus_unique_read_at_peak"] = {"step_ms": round(bound * 1e3, 3),
                                                                  "images_per_s": round(b.batch / b.n / bound, 2)}
        except Exception as exc:  # noqa: BLE001
            r["profile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    eng.release()
    umm._engine = None
    _free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def calibrate(bn: Bench, umm, b: Batch, ref: dict) -> None:
    """v1 without torch.compile, teacher-forced over the reference tokens: the bf16 rounding floor of the KL."""
    B = b.batch
    eng = ImageRollout(umm.net, impl="v1", compile=False)
    eng.sample(b.cond[:B], b.uncond[:B], b.seeds[:B], [bn.a.cfg_scale] * B, 1.0, None, pad_to=16,
               force=ref["tokens"][:B], capture=bn.a.fidelity)
    bn.res["calibration_v1_eager_vs_compiled"] = fidelity(ref["logits"], eng.captured_logits)
    eng.release()
    _free()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/cycle/janus-pro-1b.yaml")
    ap.add_argument("--shape7b", action="store_true", help=f"{CONFIG_7B}, 4 prompts x 8 images, engine v2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--engines", default=None, help="comma-separated: v1, v2, v1-fp8, v2-fp8 (the first is the "
                                                    "reference of the token match and the fidelity)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-tune", action="store_true", help="v2 engines use decode_attn.default_config")
    ap.add_argument("--fidelity", type=int, default=0, help="samples whose logits are compared, teacher-forced")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--no-share-run", action="store_true", help="skip v2's run without prefix sharing")
    a = ap.parse_args(argv)
    if a.shape7b:
        a.config = CONFIG_7B
        a.prompts = a.prompts or 4
        a.engines = a.engines or "v2"
    a.prompts = a.prompts or 32
    a.engines = a.engines or "v1,v2,v2-fp8"
    bn = Bench(a)
    res = bn.res
    t_all = time.perf_counter()
    loaded = bn.stage("load", lambda: load_for_bench(a.config, True))
    if loaded is None:
        return res
    _, umm = loaded
    b = Batch(umm, bench_prompts(a.prompts), a.samples, a.batch)
    weight_bytes = weight_bytes_per_step(umm)
    cuda = torch.cuda.is_available()
    res.update(config=a.config, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=getattr(D.triton, "__version__", None), transformers=__import__("transformers").__version__,
               dtype=str(umm.dtype).replace("torch.", ""), params=umm.num_params(),
               prompts=a.prompts, samples_per_prompt=a.samples, images=len(b.P), batch=b.batch,
               rows=b.R, prefix_slots=b.L, cache_slots=b.S, tokens_per_image=b.n, cfg_scale=a.cfg_scale,
               distinct_prefixes=int((b.prow == torch.arange(b.R, device=b.prow.device)).sum()),
               mean_left_padding=round(float(b.start.float().mean()), 1),
               slots_per_step_per_layer_head=b.slots_per_step())
    peak = PEAK_REF_TBPS * 1e12
    pk = bn.stage("peak", measure_peak) if cuda else None
    _free()
    if pk:
        res["peak"] = pk
        peak = pk["read_8GiB_bf16_TBps"] * 1e12
    res["ceiling"] = ceilings(b, weight_bytes, peak)
    res["ceiling"]["at_TBps"] = round(peak / 1e12, 3)
    bn.save()
    if a.generate:  # early: a run cut short by a time limit still has the anchor
        g = bn.stage("generate", lambda: time_generate(umm, bench_prompts(a.prompts), a.samples, a.cfg_scale))
        if g:
            res["generate"] = g
    best: dict = {}
    if a.sweep and cuda and D.triton is not None:
        sw = bn.stage("sweep", lambda: sweep(b, SWEEP, peak))
        _free()
        if sw:
            res["sweep"] = sw
            if not a.no_tune:
                best = {fmt: D.Config(*r["config"]) for fmt, r in sw["best"].items()}
    ref: dict = {}
    for i, name in enumerate(a.engines.split(",")):
        cfg = best.get("fp8" if name.endswith("fp8") else "bf16")
        bn.stage(f"engine {name}", lambda name=name, cfg=cfg: run_engine(bn, umm, b, name, cfg, ref, peak))
        if i == 0 and a.calibrate and "logits" in ref:
            bn.stage("calibrate", lambda: calibrate(bn, umm, b, ref))
    ref.pop("logits", None)
    _free()
    if res.get("generate"):
        for name, r in res.get("engines", {}).items():
            if r.get("images_per_s"):
                r["speedup_vs_generate"] = round(r["images_per_s"] / res["generate"]["images_per_s"], 2)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    bn.save()
    def brief(r: dict) -> dict:
        out = {k: r.get(k) for k in ("images_per_s", "step_ms", "cache_read_TBps_requested", "cache_read_TBps_unique",
                                     "of_peak_requested", "same_seed_same_tokens", "token_match_vs_first_engine",
                                     "config", "bound_measured_rest_plus_unique_read_at_peak")
               if r.get(k) is not None}
        if isinstance(r.get("fidelity"), dict):
            out["fidelity"] = {k: r["fidelity"][k] for k in ("kl_mean", "kl_max", "top1_agreement")}
        if r.get("no_prefix_sharing"):
            out["no_prefix_sharing_images_per_s"] = r["no_prefix_sharing"]["images_per_s"]
        return out

    cal = res.get("calibration_v1_eager_vs_compiled") or {}
    print("[rollout_bench] summary", json.dumps({
        "engines": {n: brief(r) for n, r in res.get("engines", {}).items()},
        "generate_images_per_s": (res.get("generate") or {}).get("images_per_s"), "peak": res.get("peak"),
        "calibration": {k: cal.get(k) for k in ("kl_mean", "kl_max", "top1_agreement")} if cal else None,
        "sweep_best": {f: {k: r.get(k) for k in ("config", "us", "TBps_requested", "TBps_unique")}
                       for f, r in (res.get("sweep") or {}).get("best", {}).items()},
        "sweep_v1": {f: {k: r.get(k) for k in ("us", "TBps_requested")}
                     for f, r in (res.get("sweep") or {}).get("v1", {}).items()},
        "ceiling_images_per_s": {k: v["images_per_s"] for k, v in res.get("ceiling", {}).items()
                                 if isinstance(v, dict)}}), flush=True)
    return res


if __name__ == "__main__":
    main()
