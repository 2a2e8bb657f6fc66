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

Version 2 (`decode_attention_v2`, the engine's `impl="v2"`), the same attention with less read and more in flight:
- rows start at their first unmasked slot (`start`): the left padding of short prompts is not read;
- rows with the same prefix read it from one row (`prow`): the engine prefills each distinct prefix once and points
  the others at it (the 8 samples of a prompt; unconditional rows of the same length), so the copies are read from
  L2, and only the image-token slots of each row come from DRAM;
- split over the sequence (`splits` programs per (row, head), a second kernel combines their partial softmax
  states in a fixed order: deterministic) where rows x heads are too few to fill the GPU;
- an inner loop either on tensor cores (`dot`: q padded to 16 rows, so Triton pipelines the K/V loads through
  shared memory; p is rounded to bf16 for p @ V, as in flash attention) or in fp32 registers like version 1
  (`prefetch`: the next block's K/V are loaded before the current one is used);
- exp2 with log2(e) folded into the scale.
The masks are not read: the engine's rows attend exactly [start, slot) (left padding, then every decoded slot).
"""

from __future__ import annotations

from typing import NamedTuple

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


# ---------------------------------------------------------------------- version 2
class Config(NamedTuple):
    """Launch configuration of `decode_attention_v2`: slots per block, warps, software-pipeline stages (they act on
    the `dot` loop's loads), programs per (row, head) along the sequence, the inner loop on tensor cores (`dot`) or
    in fp32 registers, and (fp32 loop) loading the next block before using the current one."""
    block_n: int = 64
    warps: int = 4
    stages: int = 3
    splits: int = 1
    dot: bool = True
    prefetch: bool = False


LOG2E = 1.4426950408889634
# (row, head) programs that fill an H200 (132 SMs x a few resident programs each); fewer get split along the sequence
FILL = 4096


def default_config(rows_x_heads: int, fp8: bool) -> Config:
    """The configurations the rollout bench's kernel sweep (model/janus/rollout_bench.py) measured fastest on an
    H200 for the 1B shape at 256 images (bf16: 352 us a layer, 4.26 TB/s requested; fp8: 234 us, 3.30 TB/s), pinned
    so that a seed gives the same tokens run to run; fewer (row, head) programs than fill the GPU are split along
    the sequence (not measured at those sizes)."""
    splits = 1 if rows_x_heads >= FILL else min(8, -(-FILL // rows_x_heads))
    if fp8:
        return Config(block_n=32, warps=1, stages=2, splits=splits, dot=False, prefetch=False)
    return Config(block_n=64, warps=4, stages=2, splits=splits, dot=True, prefetch=False)


if triton is not None:

    @triton.jit
    def _decode_v2_kernel(Q, K, V, KS, VS, START, PROW, PLEN, SLOT, KN, VN, O, PM, PL, PACC, qk_scale,
                          sq_r, sq_h, sk_r, sk_h, sk_s, ss_r, ss_h, skn_r, skn_h, svn_r, svn_h, so_r, so_h,
                          GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                          IS_FP8: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr):
        # One function, no nested @triton.jit calls: torch.compile reads the kernel's stores to know what it
        # mutates (only O, or the split buffers).
        # grid (rows, splits, heads), rows fastest: rows that share a prefix run side by side, so its second and
        # later reads come from L2
        r = tl.program_id(0)
        j = tl.program_id(1)
        h = tl.program_id(2)
        kvh = h // GROUP
        d = tl.arange(0, HD)
        ar = tl.arange(0, BLOCK_N)
        # an fp32 scalar (under torch.compile a Python float arrives as fp64; the interpreter passes a float)
        scale = tl.max(tl.full([16], 1.0, tl.float32) * qk_scale, 0).to(tl.float32)
        qraw = tl.load(Q + r.to(tl.int64) * sq_r + h * sq_h + d)
        q = qraw.to(tl.float32) * scale  # log2 units: exp2 below
        n_valid = tl.load(SLOT).to(tl.int32)  # cached slots [0, slot); this row attends [start, slot)
        st = tl.load(START + r)
        plen = tl.load(PLEN)  # slots [0, plen) are the prefix, read from row PROW[r]
        if SPLITS == 1:
            lo = st
            hi = n_valid
        else:  # equal shares of this row's slots, in whole blocks
            chunk = tl.cdiv(tl.cdiv(n_valid - st, SPLITS), BLOCK_N) * BLOCK_N
            lo = st + j * chunk
            hi = tl.minimum(lo + chunk, n_valid)
        pr = tl.load(PROW + r).to(tl.int64)
        kb_p = pr * sk_r + kvh * sk_h
        kb_r = r.to(tl.int64) * sk_r + kvh * sk_h
        sb_p = pr * ss_r + kvh * ss_h
        sb_r = r.to(tl.int64) * ss_r + kvh * ss_h
        # finite start: a share with no slot leaves (m, l, acc) = (-1e30, 0, 0), which the combine weighs 0
        m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        if DOT:  # q in row 0 of 16 (tl.dot's least): the K/V loads feed dots, so Triton pipelines them
            row0 = tl.arange(0, 16)[:, None] == 0
            if IS_FP8:  # fp8 e4m3 -> fp16 is one hardware conversion per pair on sm_89+; to bf16 it is not
                q16 = tl.where(row0, qraw[None, :], 0.0).to(tl.float16)
            else:
                q16 = tl.where(row0, qraw[None, :], 0.0).to(qraw.dtype)
            acc16 = tl.zeros([16, HD], tl.float32)
        else:
            acc = tl.zeros([HD], tl.float32)
        if PREFETCH:
            n0 = lo + ar
            kv0 = tl.where(n0 < plen, kb_p, kb_r)[:, None] + n0[:, None] * sk_s + d[None, :]
            kt = tl.load(K + kv0, mask=(n0 < hi)[:, None], other=0.0)
            vt = tl.load(V + kv0, mask=(n0 < hi)[:, None], other=0.0)
        for start in range(lo, hi, BLOCK_N):
            n = start + ar
            inb = n < hi
            pre = n < plen
            kvo = tl.where(pre, kb_p, kb_r)[:, None] + n[:, None] * sk_s + d[None, :]  # a prefix from row PROW[r]
            so = tl.where(pre, sb_p, sb_r) + n
            if PREFETCH:  # the next block's loads go out before this block is used
                nn = n + BLOCK_N
                kvn = tl.where(nn < plen, kb_p, kb_r)[:, None] + nn[:, None] * sk_s + d[None, :]
                k_nx = tl.load(K + kvn, mask=(nn < hi)[:, None], other=0.0)
                v_nx = tl.load(V + kvn, mask=(nn < hi)[:, None], other=0.0)
                k = kt
                v = vt
                kt = k_nx
                vt = v_nx
            else:
                k = tl.load(K + kvo, mask=inb[:, None], other=0.0)
                v = tl.load(V + kvo, mask=inb[:, None], other=0.0)
            if DOT:
                s = tl.sum(tl.dot(q16, tl.trans(k.to(q16.dtype))), 0) * scale
            else:
                s = tl.sum(k.to(tl.float32) * q[None, :], 1)
            if IS_FP8:
                s = s * tl.load(KS + so, mask=inb, other=0.0)
            s = tl.where(inb, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            if DOT:  # p rounded to the dot's dtype for p @ V, as in flash attention
                if IS_FP8:  # V's slot scales over the block's largest, so p * scale stays in fp16's normal range
                    vsc = tl.load(VS + so, mask=inb, other=0.0)
                    vmax = tl.max(vsc, 0)
                    vmax = tl.where(vmax > 0, vmax, 1.0)
                    p16 = tl.where(row0, (p * (vsc / vmax))[None, :], 0.0).to(q16.dtype)
                    acc16 = acc16 * alpha + tl.dot(p16, v.to(q16.dtype)) * vmax
                else:
                    p16 = tl.where(row0, p[None, :], 0.0).to(q16.dtype)
                    acc16 = acc16 * alpha + tl.dot(p16, v.to(q16.dtype))
            else:
                if IS_FP8:
                    p = p * tl.load(VS + so, mask=inb, other=0.0)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        if DOT:
            acc = tl.sum(acc16, 0)
        if SPLITS == 1:  # the step's own key and value, then the output
            kn = tl.load(KN + r * skn_r + kvh * skn_h + d).to(tl.float32)
            vn = tl.load(VN + r * svn_r + kvh * svn_h + d).to(tl.float32)
            s_n = tl.sum(kn * q, 0)
            m_new = tl.maximum(m_i, s_n)
            alpha = tl.exp2(m_i - m_new)
            p_n = tl.exp2(s_n - m_new)
            l_i = l_i * alpha + p_n
            acc = acc * alpha + p_n * vn
            tl.store(O + r.to(tl.int64) * so_r + h * so_h + d, (acc / l_i).to(O.dtype.element_ty))
        else:  # this share's softmax state, for _combine_kernel
            pid = (r.to(tl.int64) * tl.num_programs(2) + h) * SPLITS + j
            tl.store(PM + pid, m_i)
            tl.store(PL + pid, l_i)
            tl.store(PACC + pid * HD + d, acc)

    @triton.jit
    def _combine_kernel(Q, KN, VN, PM, PL, PACC, O, qk_scale, sq_r, sq_h, skn_r, skn_h, svn_r, svn_h, so_r, so_h,
                        GROUP: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr):
        """The split shares of one (row, head) and the step's own key, in a fixed order."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, HD)
        scale = tl.max(tl.full([16], 1.0, tl.float32) * qk_scale, 0).to(tl.float32)
        q = tl.load(Q + r.to(tl.int64) * sq_r + h * sq_h + d).to(tl.float32) * scale
        kn = tl.load(KN + r * skn_r + kvh * skn_h + d).to(tl.float32)
        acc = tl.load(VN + r * svn_r + kvh * svn_h + d).to(tl.float32)
        m_i = tl.sum(kn * q, 0)
        l_i = m_i * 0.0 + 1.0
        base = (r.to(tl.int64) * tl.num_programs(1) + h) * SPLITS
        for j in tl.static_range(SPLITS):
            mj = tl.load(PM + base + j)
            lj = tl.load(PL + base + j)
            aj = tl.load(PACC + (base + j) * HD + d)
            m_new = tl.maximum(m_i, mj)
            a = tl.exp2(m_i - m_new)
            b = tl.exp2(mj - m_new)
            l_i = l_i * a + lj * b
            acc = acc * a + aj * b
            m_i = m_new
        tl.store(O + r.to(tl.int64) * so_r + h * so_h + d, (acc / l_i).to(O.dtype.element_ty))


def decode_attention_v2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, prow: torch.Tensor,
                        plen: torch.Tensor, slot: torch.Tensor, scale: float, k_new: torch.Tensor,
                        v_new: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """Attention of one query per row over cached slots [start[r], slot) and the step's own key and value; slots
    below plen come from row prow[r] of the cache (its prefix), the rest from row r.

    q (R, H, 1, hd); k, v (R, KVH, S_max, hd) in q's dtype, or fp8 with k_scale/v_scale (R, KVH, S_max);
    start, prow (R,) int32; plen, slot (1,) on the device; k_new, v_new (R, KVH, 1, hd) in q's dtype.
    """
    R, H, _, hd = q.shape
    KVH = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, v, k_new, v_new)) or hd & (hd - 1) or hd < 16:
        raise ValueError("decode_attention_v2: the head dimension must be contiguous and a power of two >= 16")
    fp8 = k_scale is not None
    c = config or default_config(R * H, fp8)
    o = torch.empty_like(q)
    ks, vs = (k_scale, v_scale) if fp8 else (q, q)  # unused pointers when not fp8
    if c.splits > 1:
        pm = torch.empty(R, H, c.splits, device=q.device, dtype=torch.float32)
        pl = torch.empty(R, H, c.splits, device=q.device, dtype=torch.float32)
        pacc = torch.empty(R, H, c.splits, hd, device=q.device, dtype=torch.float32)
    else:  # not written: distinct dummies, so no argument aliases another
        pm = torch.empty(1, device=q.device, dtype=torch.float32)
        pl = torch.empty(1, device=q.device, dtype=torch.float32)
        pacc = torch.empty(1, device=q.device, dtype=torch.float32)
    extra = {"num_stages": c.stages} if c.stages else {}
    qk_scale = float(scale) * LOG2E
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
               ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0, k_new.stride(0), k_new.stride(1),
               v_new.stride(0), v_new.stride(1), o.stride(0), o.stride(1))
    _decode_v2_kernel[(R, c.splits, H)](q, k, v, ks, vs, start, prow, plen, slot, k_new, v_new, o, pm, pl, pacc,
                                        qk_scale, *strides, GROUP=H // KVH, HD=hd, BLOCK_N=c.block_n,
                                        SPLITS=c.splits, IS_FP8=fp8, DOT=bool(c.dot), PREFETCH=bool(c.prefetch),
                                        num_warps=c.warps, **extra)
    if c.splits > 1:
        _combine_kernel[(R, H)](q, k_new, v_new, pm, pl, pacc, o, qk_scale, q.stride(0), q.stride(1),
                                k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), o.stride(0),
                                o.stride(1), GROUP=H // KVH, HD=hd, SPLITS=c.splits, num_warps=1)
    return o


if triton is not None:

    @triton.jit
    def _write_slot_kernel(DST, SRC, SLOT, total, S, D: tl.constexpr, BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < total
        slot = tl.load(SLOT).to(tl.int64)
        x = tl.load(SRC + e, mask=ok)
        tl.store(DST + (e // D) * (S * D) + slot * D + e % D, x, mask=ok)


def write_slot(dst: torch.Tensor, src: torch.Tensor, slot: torch.Tensor, dim: int) -> None:
    """dst.index_copy_(dim, slot, src) (src.shape[dim] == 1, slot (1,) on the device); on a GPU with a contiguous
    dst, one Triton launch. Why: torch splits a copy into a tensor of more than 2**31 bytes (the v2 cache of all
    layers, 35 GB at 256 images) into one launch per 2**31-byte piece, 32 small launches per tensor each step."""
    if available(dst.device) and dst.is_contiguous():
        write_slot_triton(dst, src.contiguous(), slot, dim)
    else:
        dst.index_copy_(dim, slot, src)


def write_slot_triton(dst: torch.Tensor, src: torch.Tensor, slot: torch.Tensor, dim: int) -> None:
    if not (dst.is_contiguous() and src.is_contiguous()) or src.shape[dim] != 1 \
            or src.shape[:dim] + src.shape[dim + 1:] != dst.shape[:dim] + dst.shape[dim + 1:]:
        raise ValueError(f"write_slot: dst {tuple(dst.shape)} and src {tuple(src.shape)} must be contiguous and "
                         f"differ only in dim {dim}, where src has size 1")
    S, D = dst.shape[dim], dst[(0,) * (dim + 1)].numel()
    total = src.numel()
    BLOCK = 2048
    _write_slot_kernel[(triton.cdiv(total, BLOCK),)](dst, src, slot, total, S, D=D, BLOCK=BLOCK, num_warps=4)


def decode_attention_v2_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                            prow: torch.Tensor, plen, slot, scale: float, k_new: torch.Tensor, v_new: torch.Tensor,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention_v2` in fp32 torch ops (tests, and the engine's v2 step where there is no Triton)."""
    n, L = int(slot), int(plen)
    pr = prow.long()

    def shared(t):  # each row's prefix slots from its prefix row
        if t is None:
            return None
        t = t[:, :, :n].clone()
        t[:, :, :L] = t[pr, :, :L]
        return t

    k, v, k_scale, v_scale = (shared(t) for t in (k, v, k_scale, v_scale))
    mask = torch.arange(n, device=q.device)[None, :] >= start.long()[:, None]
    return decode_attention_ref(q, k, v, mask, n, scale, k_new, v_new, k_scale, v_scale)
