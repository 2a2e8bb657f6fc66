"""The rollout engine's decode attention alone, at the Janus-Pro-1B shape: time, achieved bandwidth, error, bits.

    python scripts/bench_janus_attn.py [--rows 512] [--prefix 48] [--out runs/bench/janus_attn.json]

For each cache length: the engine's three decode attentions (model/janus/rollout.py `_attend`: Triton kernel,
matmul, SDPA) over a bf16 cache and the Triton kernel over an fp8 cache, each timed on one layer's cache (CUDA
events, median of 50), with GB/s counting the K/V (and scale) bytes it must read, the largest error against an fp32
reference, and whether two runs give the same bits. A sweep of the kernel's block size and warps comes first.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from model.janus import decode_attn as D
    from model.janus.bench import emit
    from model.janus.rollout import ImageRollout
    from model.janus.rollout_bench import median_seconds

    torch.manual_seed(0)
    R, H, hd, S = a.rows, a.heads, a.head_dim, a.prefix + a.tokens
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(R, H, 1, hd, device=dev, dtype=dt)
    k = torch.randn(R, H, S, hd, device=dev, dtype=dt)
    v = torch.randn(R, H, S, hd, device=dev, dtype=dt)
    kq, ks = D.quantize_fp8(k)
    vq, vs = D.quantize_fp8(v)
    mask = torch.ones(R, S, dtype=torch.bool, device=dev)
    mask[: R // 2, : a.prefix // 3] = False  # left padding in half the rows
    scale = 1 / math.sqrt(hd)
    eng = ImageRollout.__new__(ImageRollout)  # only _attend's fields
    eng.H = eng.KVH = H
    res: dict = {"device": torch.cuda.get_device_name(), "rows": R, "heads": H, "head_dim": hd, "slots": S,
                 "sweep": [], "lengths": []}

    def triton(n: int, fp8: bool, config=None):
        """The kernel at cache length n: slots [0, n-1) cached, slot n-1 as the step's own key and value."""
        kk, vv, sc = (kq, vq, (ks, vs)) if fp8 else (k, v, ())
        slot = torch.tensor([n - 1], device=dev)
        kn, vn = k[:, :, n - 1:n], v[:, :, n - 1:n]
        return lambda: D.decode_attention(q, kk, vv, mask, slot, scale, kn, vn, *sc, config=config)

    n = a.prefix + a.tokens // 2
    for fp8 in (False, True):
        for block_n in (32, 64, 128, 256):
            for warps in (1, 2, 4):
                for stages in (1, 2, 3, 4):
                    try:
                        t = median_seconds(triton(n, fp8, (block_n, warps, stages)), iters=20)
                    except Exception as exc:  # a config the compiler refuses (too much shared memory)
                        res["sweep"].append({"fp8": fp8, "config": [block_n, warps, stages], "error": str(exc)[:80]})
                        continue
                    nbytes = 2 * R * H * n * (hd * (1 if fp8 else 2) + (4 if fp8 else 0))
                    res["sweep"].append({"fp8": fp8, "config": [block_n, warps, stages], "length": n,
                                         "ms": round(t * 1e3, 4), "GB_per_s": round(nbytes / t / 1e9, 1)})
    for n in (a.prefix + 64, a.prefix + a.tokens // 2, S):
        bucket = min(S, int(math.ceil(n / 64)) * 64)
        ref = D.decode_attention_ref(q, k, v, mask, n - 1, scale, k[:, :, n - 1:n], v[:, :, n - 1:n])
        row = {"length": n}
        m = mask.clone()
        m[:, n - 1] = True
        m[:, n:] = False
        st = SimpleNamespace(attn="", k=[k], v=[v], k_scale=None, v_scale=None, mask=m)
        for name, attn, fp8 in (("triton", "triton", False), ("triton_fp8", "triton", True),
                                ("matmul", "matmul", False), ("sdpa", "sdpa", False)):
            st.attn = attn
            fn = triton(n, fp8) if attn == "triton" else (lambda: eng._attend(st, 0, q, None, None, bucket, scale,
                                                                              None))
            o1, o2 = fn(), fn()
            t = median_seconds(fn, iters=50)
            nbytes = 2 * R * H * (n if attn == "triton" else bucket) * (hd * (1 if fp8 else 2) + (4 if fp8 else 0))
            row[name] = {"ms": round(t * 1e3, 4), "GB_per_s": round(nbytes / t / 1e9, 1),
                         "max_err_vs_fp32": round(float((o1.float() - ref.float()).abs().max()), 5),
                         "repeat_bits_equal": bool(torch.equal(o1, o2))}
        res["lengths"].append(row)
    best = {f: min((r for r in res["sweep"] if r["fp8"] == f and "ms" in r), key=lambda r: r["ms"])
            for f in (False, True)}
    res["best"] = {("fp8" if f else "bf16"): b for f, b in best.items()}
    emit(res, a.out)


if __name__ == "__main__":
    main()
