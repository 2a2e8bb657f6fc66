"""Post-training throughput of the embedded model on 1..N ranks (GPUs with NCCL, or CPU with gloo), JSON.

The same DeepSpeed ZeRO-2 post-training as a cycle's posttrain stage, on a finished run's CPR dataset:

    python scripts/bench_posttrain.py --store ./runs --run tiny --nprocs 1 2 --steps 300 --micro-batch 128

Per-rank micro batch is fixed, so N ranks train N times the tokens per step (weak scaling); the speed-up is
tokens/s at N ranks over tokens/s at 1 rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from configs.schema import PosttrainConfig
from storage import Store
from tasks.posttrain import launch


def dataset_ref(store: str, run: str, stage: str) -> dict:
    """The newest committed dataset of `stage` in the run folder (its fingerprint is in the manifest)."""
    dirs = sorted(Path(Store(store).path(run)).glob(f"{stage}-*"), key=lambda p: p.stat().st_mtime)
    for d in reversed(dirs):
        manifest = d / "_manifest.json"
        if manifest.exists():
            return {"store": store, "run": run, "stage": stage, "fingerprint": json.loads(manifest.read_text())["fingerprint"]}
    raise SystemExit(f"no committed {stage!r} dataset in {Store(store).path(run)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="./runs")
    ap.add_argument("--run", default="tiny")
    ap.add_argument("--parent-dir", default="model/embedded/base")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=128)
    a = ap.parse_args()
    refs = {k: dataset_ref(a.store, a.run, k) for k in ("cpr", "dpo_pairs")}
    out = {}
    for n in a.nprocs:
        cfg = PosttrainConfig(steps=a.steps, micro_batch=a.micro_batch, nproc=n, checkpoint_every=10**6, lr=5e-5)
        work = Path(tempfile.mkdtemp(prefix=f"bench-posttrain-{n}-"))
        job = {"posttrain": cfg.model_dump(mode="json"), "parent_dir": str(Path(a.parent_dir).resolve()), **refs}
        launch(job, work, n, 1800, print)
        m = json.loads((work / "final" / "_metrics.json").read_text())
        out[f"ranks_{n}"] = {k: m.get(k) for k in ("device", "precision", "world_size", "steps", "train_s",
                                                   "tokens_per_s", "examples_per_s", "mfu", "params")}
        shutil.rmtree(work, ignore_errors=True)
    if "ranks_1" in out and len(out) > 1:
        base = out["ranks_1"]["tokens_per_s"]
        out["speedup"] = {k: round(v["tokens_per_s"] / base, 3) for k, v in out.items() if k != "ranks_1"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
