"""Is the rollout engine run-to-run deterministic on this GPU? Same batch twice, with and without CUDA graphs.

    python scripts/bench_janus_determinism.py [--config configs/cycle/janus-pro-1b.yaml] [--images 32]
                                              [--attn auto|triton|matmul|sdpa] [--kv-cache model|fp8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/cycle/janus-pro-1b.yaml")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--attn", default=None, help="decode attention (default: the engine's, JANUS_ROLLOUT_ATTN)")
    ap.add_argument("--kv-cache", default="model")
    ap.add_argument("--compile", action="store_true", help="torch.compile the Triton-attention step")
    ap.add_argument("--graphs-only", action="store_true", help="skip the eager runs")
    a = ap.parse_args()
    import os

    import torch

    from model.janus.bench import bench_prompts, load_for_bench

    _, umm = load_for_bench(a.config, True)
    umm.engine.attn = a.attn or umm.engine.attn
    umm.engine.kv_cache = a.kv_cache
    umm.engine.compile = a.compile
    ps = bench_prompts(a.images)
    cond = [umm._gen_prefix(p) for p in ps]
    unc = [umm._gen_prefix(p, uncond=True) for p in ps]
    seeds, sc = list(range(len(ps))), [5.0] * len(ps)
    res = {"cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "attn": umm.engine.attn,
           "kv_cache": a.kv_cache, "compile": a.compile}
    outs = {}
    for mode in ("graphs",) if a.graphs_only else ("graphs", "eager"):
        umm.engine.use_graphs = mode == "graphs"
        umm.engine.release()
        runs = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runs.append(umm.engine.sample(cond, unc, seeds, sc, 1.0, None, pad_to=16).cpu())
            torch.cuda.synchronize()
            res[f"{mode}_s"] = round(time.perf_counter() - t, 3)
        outs[mode] = runs
        res[f"{mode}_repeat_equal"] = bool(torch.equal(runs[0], runs[1]))
        res[f"{mode}_repeat_match"] = round(float((runs[0] == runs[1]).float().mean()), 4)
    if "eager" in outs:
        res["graphs_vs_eager_match"] = round(float((outs["graphs"][1] == outs["eager"][1]).float().mean()), 4)
    # compare across processes (run-to-run): the same digest on every run means the same tokens
    res["tokens_sha256"] = hashlib.sha256(outs["graphs"][0].numpy().tobytes()).hexdigest()[:16]
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
