"""rollout: N images per valid prompt, sharded, deterministic.

Sample i of a prompt uses seed = f(run seed, prompt id, i) and CFG scale linspace(cfg_min, cfg_max, N)[i]
(UniCorn's sweep), so any shard can be recomputed alone and gives the same images. A prompt that returns from
the discard pool (curriculum) gets `pool_samples_per_prompt` samples: a larger budget where the last one found
nothing good.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from configs.schema import RolloutConfig
from model.protocol import require_role
from storage import DatasetRef, to_png
from tasks.stage import POOL_SOURCE, StageContext, StagePlan, StageSpec, make_plan, read, stable_seed

# temperature and top_k: the backend's token sampling, null for a backend that samples otherwise; `sampling`
# holds all of its sampling parameters (JSON)
SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("seed", pa.int64()),
                    ("cfg_scale", pa.float32()), ("temperature", pa.float32()), ("top_k", pa.int32()),
                    ("sampling", pa.string()), ("image", pa.binary()), ("checkpoint_id", pa.string()),
                    ("gen_ms", pa.float32())])
STAGE = StageSpec(name="rollout", code_version="2", section="rollout", inputs=("prompts",),
                  outputs={"rollouts": SCHEMA}, sharded=True)


def cfg_scales(cfg: RolloutConfig, n: int | None = None) -> list[float]:
    return [round(float(x), 4) for x in np.linspace(cfg.cfg_min, cfg.cfg_max, n or cfg.samples_per_prompt)]


def samples_for(cfg: RolloutConfig, source: str) -> int:
    if source == POOL_SOURCE and cfg.pool_samples_per_prompt is not None:
        return cfg.pool_samples_per_prompt
    return cfg.samples_per_prompt


def plan(inputs: dict[str, DatasetRef], cfg: RolloutConfig, ctx: StageContext) -> StagePlan:
    prompts = read(inputs["prompts"], ["prompt_id", "prompt", "source", "valid"]).to_pylist()
    valid = [(r["prompt_id"], r["prompt"], samples_for(cfg, r["source"])) for r in prompts if r["valid"]]
    if not valid:
        raise ValueError(f"rollout: dataset {inputs['prompts'].name} has no valid prompts")
    k = cfg.prompts_per_shard
    shards = [valid[j:j + k] for j in range(0, len(valid), k)]
    # the batch size changes speed, not images: it stays out of the fingerprint (and an unset pool budget, so
    # recipes without one keep their datasets)
    speed = {"batch_size"} | ({"pool_samples_per_prompt"} if cfg.pool_samples_per_prompt is None else set())
    return make_plan(STAGE, inputs, cfg.model_dump(mode="json", exclude=speed), ctx,
                     n_parts=len(shards), shards=shards, cfg=cfg)


def compute_part(p: StagePlan, i: int, ctx: StageContext) -> pa.Table:
    cfg: RolloutConfig = p.extra["cfg"]
    model = ctx.model
    require_role(model, "generate")
    scales = {n: cfg_scales(cfg, n) for n in {n for _, _, n in p.shards[i]}}
    jobs = [(pid, text, s, scales[n][s]) for pid, text, n in p.shards[i] for s in range(n)]
    rows, sampling = [], json.dumps(cfg.sampling, sort_keys=True)
    for j in range(0, len(jobs), cfg.batch_size):
        batch = jobs[j:j + cfg.batch_size]
        seeds = [stable_seed(ctx.run_seed, pid, s) for pid, _, s, _ in batch]
        t0 = time.perf_counter()
        images = model.generate([t for _, t, _, _ in batch], seeds, [c for _, _, _, c in batch], **cfg.sampling)
        ms = 1000 * (time.perf_counter() - t0) / len(batch)
        rows += [{"prompt_id": pid, "sample_idx": s, "seed": seed, "cfg_scale": c,
                  "temperature": cfg.sampling.get("temperature"), "top_k": cfg.sampling.get("top_k"),
                  "sampling": sampling, "image": to_png(img),
                  "checkpoint_id": model.model_id, "gen_ms": ms}
                 for (pid, _, s, c), seed, img in zip(batch, seeds, images)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)

