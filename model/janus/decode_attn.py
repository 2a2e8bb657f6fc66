"""Decode-step attention over the rollout engine's static KV cache: one Triton kernel, and an fp8 cache format.

Why a kernel: at 512 rows (256 images with CFG) a decoding step of Janus-Pro-1B reads about 32 GB of KV cache (full
multi-head attention, 24 layers), so the step is bound by memory. The plain-matmul path (q @ K^T as batched GEMVs,
an fp32 score tensor, softmax, w @ V) reads the cache at about half the memory bandwidth; SDPA's masked q_len=1
kernel was faster but not run-to-run deterministic. This kernel streams K and V once per (row, head) with an online
softmax, in a fixed order (one program per (row, head), no split-K, no atomics): the same inputs give the same bits
on every run. It reads the current cache length from the engine's slot counter, so one CUDA graph serves every step
(no length buckets) and no slot past the current one is read; the step's own key and value come as arguments (exact,
also with an fp8 cache), so the step's computation reads the cache and writes nothing but its output: the engine
writes the cache after it, which lets torch.compile take the whole step as a pure function.

fp8 cache (`kv_cache="fp8"`, opt-in): K and V stored as float8_e4m3fn with one fp32 scale per (row, kv head, slot)
(the vector's amax / 448), about half the bytes read per step. It changes the attention's inputs by the fp8 rounding
(3 mantissa bits), hence some sampled tokens: the bench measures how many.
"""

from __future__ import annotations

import torch

try:  # GPU machines have Triton; CPU-only installs fall back to the engine's matmul attention
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) -> (fp8 values (..., hd), fp32 scales (...)) with x ~= values * scale per vector."""
    scale = x.abs().amax(-1).float().clamp_(min=1e-12) / FP8_MAX
    return (x.float() / scale[..., None]).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, KS, VS, MASK, SLOT, KN, VN, O, sm_scale,
                       sq_r, sq_h, sk_r, sk_h, sk_s, ss_r, ss_h, sm_r, skn_r, skn_h, svn_r, svn_h, so_r, so_h,
                       GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr):
        r = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, HD)
        # fp32 throughout (under torch.compile a Python float scale arrives as fp64)
        q = (tl.load(Q + r * sq_r + h * sq_h + d).to(tl.float32) * sm_scale).to(tl.float32)
        n_valid = tl.load(SLOT)  # cached keys at slots [0, slot); the mask says which of them this row attends
        kb = r * sk_r + kvh * sk_h
        sb = r * ss_r + kvh * ss_h
        m_i = -1.0e30  # finite start: a block of left padding (all masked) gives p = 0, not NaN
        l_i = 0.0
        acc = tl.zeros([HD], dtype=tl.float32)
        for start in range(0, n_valid, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inb = n < n_valid
            keep = tl.load(MASK + r * sm_r + n, mask=inb, other=0) != 0
            k = tl.load(K + kb + n[:, None] * sk_s + d[None, :], mask=inb[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], 1)
            if IS_FP8:
                s = s * tl.load(KS + sb + n, mask=inb, other=0.0)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            if IS_FP8:
                p = p * tl.load(VS + sb + n, mask=inb, other=0.0)
            v = tl.load(V + kb + n[:, None] * sk_s + d[None, :], mask=inb[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        # the step's own key and value (always attended)
        kn = tl.load(KN + r * skn_r + kvh * skn_h + d).to(tl.float32)
        vn = tl.load(VN + r * svn_r + kvh * svn_h + d).to(tl.float32)
        s_n = tl.sum(kn * q, 0)
        m_new = tl.maximum(m_i, s_n)
        alpha = tl.exp(m_i - m_new)
        p_n = tl.exp(s_n - m_new)
        l_i = l_i * alpha + p_n
        acc = acc * alpha + p_n * vn
        tl.store(O + r * so_r + h * so_h + d, (acc / l_i).to(O.dtype.element_ty))


# (BLOCK_N, num_warps, num_stages) by cache format, the fastest of a sweep at 512 rows x 16 heads x 128 on an H200
# (scripts/bench_janus_attn.py; docs/janus.md)
CONFIGS = {False: (32, 1, 2), True: (32, 1, 3)}


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor,
                     scale: float, k_new: torch.Tensor, v_new: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """Attention of one query per row over the cached keys at slots [0, slot) that `mask` allows, and the step's
    own key and value (k_new, v_new (R, KVH, 1, hd), q's dtype).

    q (R, H, 1, hd); k, v (R, KVH, S_max, hd) in q's dtype, or fp8 with k_scale/v_scale (R, KVH, S_max);
    mask (R, S_max) bool; slot (1,) int64 on the device. Returns (R, H, 1, hd) in q's dtype.
    """
    R, H, _, hd = q.shape
    KVH = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, v, k_new, v_new)) or hd & (hd - 1):
        raise ValueError("decode_attention: the head dimension must be contiguous and a power of two")
    fp8 = k_scale is not None
    block_n, num_warps, num_stages = config or CONFIGS[fp8]
    extra = {"num_stages": num_stages} if num_stages else {}
    o = torch.empty_like(q)
    ks = k_scale if fp8 else q  # unused pointers when not fp8
    vs = v_scale if fp8 else q
    _decode_kernel[(R, H)](q, k, v, ks, vs, mask, slot, k_new, v_new, o, scale,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                           ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0, mask.stride(0),
                           k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), o.stride(0), o.stride(1),
                           GROUP=H // KVH, HD=hd, BLOCK_N=block_n, IS_FP8=fp8, num_warps=num_warps, **extra)
    return o


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slot: int,
                         scale: float, k_new: torch.Tensor, v_new: torch.Tensor, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention in fp32 torch ops (tests and the kernel's check)."""
    n = int(slot)
    if k_scale is not None:
        k, v = dequantize_fp8(k[:, :, :n], k_scale[:, :, :n], torch.float32), \
            dequantize_fp8(v[:, :, :n], v_scale[:, :, :n], torch.float32)
    k = torch.cat([k[:, :, :n].float(), k_new.float()], 2)
    v = torch.cat([v[:, :, :n].float(), v_new.float()], 2)
    m = torch.cat([mask[:, :n], torch.ones_like(mask[:, :1])], 1)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = (q.float() @ k.transpose(-1, -2)) * scale
    w = torch.softmax(w.masked_fill(~m[:, None, None, :], float("-inf")), -1)
    return (w @ v).to(q.dtype)
