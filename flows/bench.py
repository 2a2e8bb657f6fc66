"""`selfplay bench stages` (wall time of each generation-side stage on the embedded model) and `selfplay bench
scale` (rollout + judge in-process and on Dask workers through the runner), JSON."""

from __future__ import annotations

import os
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


def bench_scale(config: str, overrides: list[str], prompts: int = 64, workers: tuple[int, ...] = (1, 2),
                local: bool = True, judge: bool = True) -> dict:
    """rollout + judge of `prompts` fixed ShapeWorld prompts through the runner a cycle uses: in-process
    (`local`), then on a Dask cluster of each worker count. Images/s from the first shard's start to the last
    one's end (model loading excluded); the datasets of every run are compared row for row (gen_ms aside)."""
    from configs.loader import load_config
    from flows.dags import Dag, Node
    from flows.runner import run_dag
    from storage import Dataset, NodeRecord
    from tasks.suite import suite_prompts

    base = load_config(config, CycleConfig, overrides)
    store = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        ref = _fixed_prompts(store, [p for _, p in suite_prompts(base.benchmark)][:prompts])
        dag = Dag("scale", (Node("propose", "propose"), Node("rollout", "rollout"), Node("judge", "judge")))
        # the Dask runs first: their workers exit with their cluster, so the in-process run after them finds the
        # accelerator empty (a model left resident here would not leave a worker room for its own copy)
        modes = [("dask", n) for n in workers] + ([("local", 1)] if local else [])
        out: dict = {"config": config, "prompts": prompts, "samples_per_prompt": base.rollout.samples_per_prompt,
                     "threads_per_worker": base.stages.threads_per_worker, "runs": []}
        rows = {}
        for cluster, n in modes:
            name = f"scale-{cluster}-{n}"
            cfg = base.model_copy(update={
                "run": base.run.model_copy(update={"name": name, "store": store, "cluster": cluster}),
                "stages": base.stages.model_copy(update={"workers": n})})
            steps = (("rollout", "rollouts"), ("judge", "judgements"))[: 2 if judge else 1]
            rec = run_dag(dag, cfg, given={"propose": NodeRecord(stage="propose", outputs={"prompts": ref})},
                          nodes=[s for s, _ in steps])
            run = {"cluster": cluster, "workers": n if cluster != "local" else 0}
            for node, ds in steps:
                d = Dataset(rec.outputs(node)[ds])
                m = d.manifest()
                run[f"{node}_wall_s"] = m.timings.get("wall_s")
                run[f"{node}_images_per_s"] = round(m.rows / m.timings["wall_s"], 2) if m.timings.get("wall_s") else None
                rows[(name, ds)] = sorted(tuple(sorted((k, str(v)) for k, v in r.items() if k != "gen_ms"))
                                          for r in d.read().to_pylist())
            run["images_per_s"] = round(m.rows / sum(run[f"{s}_wall_s"] for s, _ in steps), 2)
            out["runs"].append(run)
        names = sorted({n for n, _ in rows})
        out["datasets_equal"] = all(rows[(a, ds)] == rows[(names[0], ds)] for a, ds in rows)
        first = next(r for r in out["runs"] if r["cluster"] == "dask")
        for r in out["runs"]:
            r["speedup_vs_one_worker"] = round(r["images_per_s"] / first["images_per_s"], 3)
        return out
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _fixed_prompts(store: str, texts: list[str]):
    """A prompts dataset of these texts, as propose would write them (valid, source 'suite')."""
    import pyarrow as pa

    from storage import DatasetRef, build, fingerprint
    from tasks.propose import SCHEMA
    from tasks.stage import prompt_id

    ref = DatasetRef(store=store, run="scale", stage="prompts",
                     fingerprint=fingerprint("bench-prompts", texts, {}, None, "1"))
    rows = [{"prompt_id": prompt_id(t), "cycle": 0, "category": "", "prompt": t, "seed_prompt_ids": [],
             "source": "suite", "valid": True, "invalid_reason": None} for t in texts]
    build(ref, 1, lambda _: pa.Table.from_pylist(rows, schema=SCHEMA), config={}, upstream={}, model_id=None,
          code_version="1", log=lambda _: None)
    return ref


def bench_judge(judgements: int = 100, model_dir: str | None = None, served_name: str = "tiny-qwen2-vl",
                concurrency: int = 8, cache: str = "./runs/vlm") -> dict:
    """Judgements/s of the external VLM judge through each transport (a `vllm serve` endpoint on 127.0.0.1, and
    an in-process engine of vLLM's environment), each engine's start time beside it. Default engine: the tiny
    random Qwen2-VL that the tests serve, built once under `cache`."""
    from PIL import Image

    from model.vlm import VLMConfig
    from model.vlm.geneval import suite_prompts
    from model.vlm.judge import VLMJudge
    from model.vlm.server import VLLMServer, ensure_tiny_model

    directory = str(model_dir or ensure_tiny_model(f"{cache}/{served_name}"))
    prompts = [sp.prompt for sp in suite_prompts(80, 0)]
    prompts = [prompts[i % len(prompts)] for i in range(judgements)]
    images = [Image.new("RGB", (64, 64), ((41 * i) % 256, (97 * i) % 256, (13 * i) % 256)) for i in range(judgements)]

    def timed(vlm: VLMJudge) -> dict:
        vlm.judge(prompts[:4], images[:4])  # warm-up: the first requests compile and allocate
        t = time.perf_counter()
        verdicts = vlm.judge(prompts, images)
        s = time.perf_counter() - t
        return {"judgements_per_s": round(len(verdicts) / s, 2), "seconds": round(s, 2),
                "valid": sum(v.parse_ok for v in verdicts), "judgements": len(verdicts)}

    out: dict = {"model": served_name, "model_dir": directory, "judgements": judgements, "cpus": os.cpu_count()}
    server = VLLMServer(directory, served_name=served_name)
    try:
        start = server.start()
        out["http"] = {"server_start_s": round(start, 2), "concurrency": concurrency,
                       **timed(VLMJudge(VLMConfig(model=served_name, endpoint=server.url, concurrency=concurrency)))}
    finally:
        server.stop()
    engine = VLMJudge(VLMConfig(model=served_name, transport="inprocess", model_dir=directory))
    try:
        t = time.perf_counter()
        engine.check()
        out["inprocess"] = {"engine_start_s": round(time.perf_counter() - t, 2), **timed(engine)}
    finally:
        engine.transport.close()
    return out
