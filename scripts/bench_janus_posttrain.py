"""A Janus cycle's posttrain stage, measured: the stage's own worker (tasks/posttrain_worker.py, launched as the
stage launches it: torchrun, one rank, DeepSpeed ZeRO-2, bf16 on a GPU) on a random-weight parent of the recipe's
shapes and a CPR dataset of generation examples written as reconstruct writes it (tasks/examples.py rows, the
artifact store's Parquet parts and manifest). Prints the worker's own metrics as the last line:
{"posttrain": {..., "tokens_per_s", "mfu", ...}, "bench": {...}}.

    python scripts/bench_janus_posttrain.py [--config configs/cycle/janus-pro-1b.yaml] [--steps 30]
        [--examples 512] [--set posttrain.micro_batch=48 ...] [--work DIR] [--out FILE]

The posttrain section is the recipe's (micro-batch, accumulation, EMA, precision, ZeRO stage; `--set` overrides
any of it), with `steps` from --steps and one rank. Targets are world renders at the model's image size under
the world's prompts (real lengths, so batches are padded as in a cycle). On a CPU machine use
--config configs/cycle/janus-tiny-random.yaml (the tests do). Needs only the worker's packages: no Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe(config: str, overrides: list[str]) -> dict:
    import yaml

    from configs.loader import apply_overrides

    return apply_overrides(yaml.safe_load(open(config)) or {}, list(overrides), config)


def write_parent(data: dict, directory: Path, cuda: bool):
    """A random-weight Janus of the recipe's shapes saved as a checkpoint (bf16 on a GPU: what the worker reads
    into fp32); returns the model (for its image size and prompt lengths)."""
    from model.janus import JanusUMM
    from model.janus.backend import JanusSection

    m = JanusSection.model_validate(data["model"])
    umm = JanusUMM.random(m.janus_config, device="cuda" if cuda else "cpu",
                          dtype="bfloat16" if cuda else "float32", settings=m.settings)
    umm.save_pretrained(directory)
    return umm


def write_cpr(data: dict, store: str, n: int, size: int, seed: int = 0) -> tuple[dict, list[str]]:
    """`n` generation examples (world prompts, renders of them as targets) as a committed `cpr` dataset, split
    train / held-out by the recipe's reconstruct section; returns (its ref, the prompts)."""
    import pyarrow as pa

    from configs.schema import ReconstructConfig
    from model.world import CATEGORIES, parse, render, sample_prompt, sample_scene
    from storage import DatasetRef, build, fingerprint, to_png
    from tasks.examples import EXAMPLES, example_row
    from tasks.stage import prompt_id

    rc = ReconstructConfig.model_validate(data.get("reconstruct") or {})
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        cat = CATEGORIES[len(rows) % len(CATEGORIES)]
        p = sample_prompt(cat, rng)
        if p in seen:
            continue
        seen.add(p)
        image = render(sample_scene(parse(p).spec, rng), size)
        rows.append(example_row(rc, "generation", prompt_id(p), [0], {"prompt": p, "category": cat},
                                input_text=p, target_image=to_png(image), score=9))
    config = {"bench": "janus-posttrain", "examples": n, "size": size, "seed": seed}
    ref = DatasetRef(store=store, run="bench", stage="cpr",
                     fingerprint=fingerprint("reconstruct", config, {}, None, "bench"))
    build(ref, 1, lambda _: pa.Table.from_pylist(rows, schema=EXAMPLES), config=config, upstream={},
          model_id=None, code_version="bench", log=lambda _: None)
    return ref.model_dump(), sorted(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cycle/janus-pro-1b.yaml")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps (the first two are not timed)")
    ap.add_argument("--examples", type=int, default=256, help="generation examples in the CPR dataset (each "
                    "image's VQ codes are computed once: few examples, few encodes in the timed steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, dotted key (e.g. posttrain.micro_batch=48; repeatable)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--timeout", type=int, default=3000, help="seconds the worker may run")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the first timed step")
    a = ap.parse_args()
    if a.profile:
        from tasks.posttrain_worker import PROFILE_ENV

        os.environ[PROFILE_ENV] = "1"  # the worker inherits the environment

    import torch

    from configs.schema import PosttrainConfig
    from tasks.posttrain import launch

    cuda = torch.cuda.is_available()
    data = recipe(str(ROOT / a.config) if not Path(a.config).is_absolute() else a.config, a.set)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-janus-posttrain-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        umm = write_parent(data, work / "parent", cuda)
        t_parent = time.perf_counter() - t0
        size = umm.image_size
        cpr, prompts = write_cpr(data, str(work / "store"), a.examples, size)
        # prefix lengths: a batch is padded to its longest, and padding is computed but not counted
        prefix = [len(umm.gen_ids(p)) for p in prompts]
        del umm
        if cuda:
            torch.cuda.empty_cache()
        cfg = PosttrainConfig.model_validate({**(data.get("posttrain") or {}), "steps": a.steps, "nproc": 1,
                                              "timeout_s": a.timeout})
        if cfg.objective != "sft":
            raise SystemExit("this bench writes generation examples: posttrain.objective must be sft")
        job = {"posttrain": cfg.model_dump(mode="json"), "parent_dir": str(work / "parent"), "cpr": cpr}
        t1 = time.perf_counter()
        launch(job, work / "posttrain", 1, a.timeout, lambda s: print(s, flush=True))
        worker_s = time.perf_counter() - t1
        metrics = json.loads((work / "posttrain" / "final" / "_metrics.json").read_text())
        log = (work / "posttrain" / "worker.log").read_text(errors="replace").splitlines()
        if a.profile:
            at = next((i for i, ln in enumerate(log) if "profiled step" in ln), len(log))
            print("\n".join(log[at:at + 40]), flush=True)
        bench = {"config": a.config, "overrides": a.set, "examples": a.examples, "image_size": size,
                 "prefix_tokens_mean": round(sum(prefix) / len(prefix), 1), "prefix_tokens_max": max(prefix),
                 "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "ema_decay": cfg.ema_decay,
                 "parent_s": round(t_parent, 1), "worker_s": round(worker_s, 1),
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "compile_messages": [ln[:300] for ln in log
                                      if "torch.compile" in ln or "recompil" in ln.lower()][:5]}
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    from model.janus.bench import emit

    emit({"posttrain": metrics, "bench": bench}, a.out)


if __name__ == "__main__":
    main()
