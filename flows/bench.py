"""`selfplay bench stages`: wall time of each generation-side stage on the embedded model, JSON."""

from __future__ import annotations

import shutil
import tempfile
import time

import torch

from configs.schema import CycleConfig
from flows.runner import Contexts
from tasks import judge, propose, rollout, select
from tasks.stage import read, run_in_process


def bench_stages(prompts: int = 300, samples: int = 8, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    store = tempfile.mkdtemp(prefix="bench-stages-")
    try:
        cfg = CycleConfig.model_validate({"run": {"name": "bench", "store": store},
                                          "model": {"device": "cpu"},
                                          "propose": {"num_prompts": prompts},
                                          "rollout": {"samples_per_prompt": samples, "prompts_per_shard": 50}})
        ctx = Contexts(cfg, replay=False).for_checkpoint(cfg.model.checkpoint)
        ctx.log = lambda _: None
        out = {"prompts": prompts, "samples_per_prompt": samples, "torch_threads": torch.get_num_threads(),
               "model_id": ctx.model_id}
        t = time.perf_counter()
        p = run_in_process(propose, {}, cfg.propose, ctx)["prompts"]
        out["propose_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        r = run_in_process(rollout, {"prompts": p}, cfg.rollout, ctx)["rollouts"]
        out["rollout_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        j = run_in_process(judge, {"prompts": p, "rollouts": r}, cfg.judge, ctx)["judgements"]
        out["judge_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        s = select.run({"prompts": p, "judgements": j}, cfg.select, ctx)
        out["select_s"] = round(time.perf_counter() - t, 3)
        n_images = read(r, ["prompt_id"]).num_rows
        out.update(images=n_images, images_per_s=round(n_images / out["rollout_s"], 1),
                   judged_per_s=round(n_images / out["judge_s"], 1),
                   accepted=sum(read(s["selections"], ["accepted"]).column("accepted").to_pylist()),
                   rollout_plus_judge_s=round(out["rollout_s"] + out["judge_s"], 3))
        return out
    finally:
        shutil.rmtree(store, ignore_errors=True)
