"""DeepSpeed ZeRO-2 bf16 post-training throughput of a Janus shape on one GPU (random weights): tokens/s and MFU.

    python scripts/bench_janus_train.py [--config configs/cycle/janus-pro-1b.yaml] [--micro-batch 32] [--steps 10]
                                        [--out runs/bench/janus_train.json] [--compile-layers]

One step = the backend's text-to-image loss (JanusUMM.image_ce: 32 prompt tokens + 576 VQ codes per example,
cross-entropy through generation_head), backward, clipping, fused AdamW through DeepSpeed's ZeRO optimizer.
MFU = 6 x parameters on the path x tokens / time / 989 TFLOP/s. Prints JSON as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cycle/janus-pro-1b.yaml")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--compile-layers", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from model.janus.bench import bench_train

    res = bench_train(a.config, a.micro_batch, a.steps, a.warmup, zero_stage=a.zero_stage,
                      compile_layers=a.compile_layers)
    line = json.dumps(res)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
