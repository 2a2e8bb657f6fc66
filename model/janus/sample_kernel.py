"""The rollout engine's hash sampler as one Triton kernel (engine `impl="v2"` on GPU).

In torch the hash sampler (model/janus/rollout.py `hash_uniform`, then CFG, temperature, Gumbel, argmax) is about
thirty elementwise kernels over (B, 16384) int64 and fp32 tensors per decoding step, ~1.6 GB of memory traffic. This
kernel reads the head's logits once per sample and keeps everything else in registers. It computes the same
function: the uniforms bit for bit (the same splitmix64 in uint64 arithmetic), the guided logits with the same
roundings (fp contraction off: no fused multiply-add where torch rounds twice); only the two logs of the Gumbel noise
may differ from torch's in the last bit, which changes a token only at an exact near-tie.
"""

from __future__ import annotations

import torch

try:  # GPU machines have Triton; elsewhere the engine samples in torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _gumbel_argmax_kernel(LOGITS, SEEDS, SCALES, INV_T, STEP, OUT, B, V, sl_r,
                              CFG: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        seed = tl.load(SEEDS + b).to(tl.uint64, bitcast=True)
        step = tl.load(STEP).to(tl.uint64, bitcast=True)
        inv_t = tl.load(INV_T)
        base = seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9
        best_v = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        best_i = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, V, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < V
            x = tl.load(LOGITS + b.to(tl.int64) * sl_r + i, mask=ok, other=0.0).to(tl.float32)
            if CFG:  # rows [0, B) conditional, [B, 2B) unconditional: u + (c - u) * scale
                u = tl.load(LOGITS + (b + B).to(tl.int64) * sl_r + i, mask=ok, other=0.0).to(tl.float32)
                x = u + (x - u) * tl.load(SCALES + b)
            x = x * inv_t
            z = base + i.to(tl.uint64) * 0x94D049BB133111EB
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            z = z ^ (z >> 31)
            uni = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            y = x + -tl.log(-tl.log(uni))
            y = tl.where(ok, y, float("-inf"))
            m = tl.max(y, 0)
            a = tl.argmax(y, 0)  # the first index of the block's maximum
            take = m > best_v  # strictly: an earlier block keeps a tie, as torch's argmax keeps the first index
            best_i = tl.where(take, start + a, best_i)
            best_v = tl.where(take, m, best_v)
        tl.store(OUT + b, best_i.to(tl.int64))


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, scales: torch.Tensor, inv_temp: torch.Tensor,
                  step: torch.Tensor, cfg: bool, block: int = 2048) -> torch.Tensor:
    """Tokens (B,) for logits (R, V) (R = 2B with CFG: conditional rows first), seeds (B,) int64, scales (B, 1)
    fp32, inv_temp () fp32, step (1,) int64: argmax(guided logits * inv_temp + Gumbel(hash(seed, step, code)))."""
    R, V = logits.shape
    B = R // 2 if cfg else R
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(B,)](logits, seeds, scales, inv_temp, step, out, B, V, logits.stride(0), CFG=cfg,
                                BLOCK=block, num_warps=8, enable_fp_fusion=False)
    return out
