"""benchmark: a checkpoint on the fixed held-out suite (never proposed, never trained on), measured by the oracle.

Per checkpoint, on `prompts_per_category` prompts of every category x `samples` images each (seeds fixed by the
suite, so parent and child draw with the same seeds and their difference is paired):
- gen_acc_oracle (pass@1, overall and per category), best_of_n_self (the image the model's own judge ranks
  first passes the oracle), pass_at_n_oracle (any of the n passes);
- non_unification (own judge scores < threshold), weak_generation_share (of those, the oracle also rejects),
  judge_oracle_agreement;
- unicycle_soft / unicycle_hard: the model answers the prompt's questions from its own image;
- und_acc_gt: yes/no fact questions on true renders of the prompt, und_acc_perturbed: on minimally wrong ones.
Two datasets: `benchmark_items` (one row per prompt with its images, for paired comparisons) and `benchmark`
(metric rows with bootstrap 95 % intervals over prompts). Both are cached per (checkpoint, suite, config) under
the shared `benchmarks` run: a checkpoint's benchmark is the same in every run.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
from configs.schema import BenchmarkConfig
from storage import DatasetRef, to_png
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read, stable_seed
from tasks.stats import ITEMS, summarize

SHARED_RUN = "benchmarks"

METRICS = pa.schema([("suite", pa.string()), ("metric", pa.string()), ("category", pa.string()),
                     ("checkpoint_id", pa.string()), ("value", pa.float64()), ("ci_low", pa.float64()),
                     ("ci_high", pa.float64()), ("n", pa.int64())])
STAGE = StageSpec(name="benchmark", code_version="3", section="benchmark", inputs=("suite",),
                  outputs={"benchmark_items": ITEMS, "benchmark": METRICS})


def measure(model, cfg: BenchmarkConfig, suite: list[dict], log=print) -> list[dict]:
    """One row per suite prompt with everything the metrics need."""
    from model.world import answer, facts, grade, parse, perturb, questions, render, sample_scene, verify

    items = [(r["category"], r["prompt"]) for r in suite]
    prompts = [p for _, p in items]
    pids = [r["prompt_id"] for r in suite]
    flat = [(i, s) for i in range(len(prompts)) for s in range(cfg.samples)]
    seeds = [stable_seed(cfg.suite_seed, pids[i], s) for i, s in flat]
    images = model.generate([prompts[i] for i, _ in flat], seeds, [cfg.cfg_scale] * len(flat),
                            **cfg.sampling)
    own = model.judge([prompts[i] for i, _ in flat], images, None)
    oracle = [verify(prompts[i], im).ok for (i, _), im in zip(flat, images)]
    log(f"[benchmark] {len(images)} images judged by the model and the oracle")

    # UniCycle: questions about the prompt, answered from the model's own first image
    rng = random.Random(cfg.suite_seed + 1)
    qs = [questions(p, rng) for p in prompts]
    q_flat = [(i, q) for i, ql in enumerate(qs) for q in ql]
    first = [images[i * cfg.samples] for i in range(len(prompts))]
    answers = model.answer([first[i] for i, _ in q_flat], [q.text for _, q in q_flat])
    credit: list[list[float]] = [[] for _ in prompts]
    for (i, q), a in zip(q_flat, answers):
        credit[i].append(grade(q, a))

    # understanding: each fact as a yes/no question on a true render and on a minimally wrong render
    und_imgs, und_qs, und_truth, und_owner = [], [], [], []
    for i, p in enumerate(prompts):
        spec = parse(p).spec
        for kind, s in (("true", spec), ("perturbed", perturb(spec, rng))):
            scene = sample_scene(s, rng)
            img = render(scene)
            for f in facts(spec):
                und_imgs.append(img)
                und_qs.append(f.question)
                und_truth.append(answer(f, scene))
                und_owner.append((i, kind))
    said = model.answer(und_imgs, und_qs)
    und: dict[tuple[int, str], list[float]] = {}
    for key, a, t in zip(und_owner, said, und_truth):
        und.setdefault(key, []).append(float(a.strip().lower() == t))

    rows = []
    for i, (cat, p) in enumerate(items):
        sl = slice(i * cfg.samples, (i + 1) * cfg.samples)
        rows.append({"prompt_id": pids[i], "category": cat, "prompt": p, "evaluator": "oracle", "evaluator_ok": oracle[sl],
                     "self_score": [j.score if j.parse_ok else -1 for j in own[sl]],
                     "unicycle_soft": float(np.mean(credit[i])) if credit[i] else 0.0,
                     "unicycle_hard": float(all(c == 1.0 for c in credit[i])) if credit[i] else 0.0,
                     "und_true": float(np.mean(und[(i, "true")])), "und_perturbed": float(np.mean(und[(i, "perturbed")])),
                     "checkpoint_id": model.model_id, "images": [to_png(im) for im in images[sl]]})
    return rows


def measure_with_vlm(model, cfg: BenchmarkConfig, suite: list[dict], log=print) -> tuple[list[dict], dict]:
    """The real-model suite, measured by the external VLM: one row per prompt, and the count of the VLM's
    answers that did not parse (each counts as a failure: kept, never dropped).

    evaluator_ok: the VLM's verdict on each image reaches the threshold. unicycle_soft / hard: the VLM answers the
    prompt's questions from each image (mean credit / all right, averaged over the samples). und_true: the model
    answers the same questions from its own first image, agreeing with the VLM's answers."""
    from model.vlm import make_vlm
    from model.vlm.geneval import Question, grade

    vlm = make_vlm(cfg.vlm)
    vlm.check()
    prompts, pids = [r["prompt"] for r in suite], [r["prompt_id"] for r in suite]
    qs = [[Question(**{**q, "choices": tuple(q["choices"])}) for q in json.loads(r["questions"])] for r in suite]
    flat = [(i, s) for i in range(len(prompts)) for s in range(cfg.samples)]
    seeds = [stable_seed(cfg.suite_seed, pids[i], s) for i, s in flat]
    images = model.generate([prompts[i] for i, _ in flat], seeds, [cfg.cfg_scale] * len(flat), **cfg.sampling)
    own = model.judge([prompts[i] for i, _ in flat], images, None)
    verdicts = vlm.judge([prompts[i] for i, _ in flat], images)
    q_flat = [(k, q) for k, (i, _) in enumerate(flat) for q in qs[i]]
    said = vlm.answer([images[k] for k, _ in q_flat], [q.text for _, q in q_flat], [q.choices for _, q in q_flat])
    credit: list[list[float]] = [[] for _ in flat]
    for (k, q), a in zip(q_flat, said):
        credit[k].append(grade(q, a))
    # the model's own answers on its first image, against the VLM's on the same image
    first = [(k, q, a) for (k, q), a in zip(q_flat, said) if flat[k][1] == 0 and a is not None]
    mine = model.answer([images[k] for k, _, _ in first],
                        [f"{q.text} Answer with one of: {', '.join(q.choices)}." for _, q, _ in first])
    agree: dict[int, list[float]] = {}
    for (k, _, a), m in zip(first, mine):
        agree.setdefault(flat[k][0], []).append(float(m.strip().lower().rstrip(".") == a))
    unparsed = {"vlm_verdicts_unparsed": sum(not v.parse_ok for v in verdicts),
                "vlm_answers_unparsed": sum(a is None for a in said)}
    log(f"[benchmark] {len(images)} images judged by the model and {vlm.judge_id} ({unparsed})")
    rows = []
    for i, r in enumerate(suite):
        sl = slice(i * cfg.samples, (i + 1) * cfg.samples)
        mean_credit = [float(np.mean(c)) if c else 0.0 for c in credit[sl]]
        rows.append({"prompt_id": pids[i], "category": r["category"], "prompt": prompts[i], "evaluator": vlm.judge_id,
                     "evaluator_ok": [v.parse_ok and v.score >= cfg.threshold for v in verdicts[sl]],
                     "self_score": [j.score if j.parse_ok else -1 for j in own[sl]],
                     "unicycle_soft": float(np.mean(mean_credit)),
                     "unicycle_hard": float(np.mean([c == 1.0 for c in mean_credit])),
                     "und_true": float(np.mean(agree[i])) if agree.get(i) else 0.0, "und_perturbed": None,
                     "checkpoint_id": model.model_id, "images": [to_png(im) for im in images[sl]]})
    return rows, {"judged": len(verdicts), "answered": len(said), **unparsed}


def run(inputs: dict[str, DatasetRef], cfg: BenchmarkConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    """Benchmark the context's model on the suite."""
    cache: dict[str, list] = {}
    suite_name = read(inputs["suite"], ["suite"]).column("suite")[0].as_py()

    def items(_: int) -> pa.Table:
        suite = read(inputs["suite"]).to_pylist()
        stats = {}
        if cfg.evaluator == "vlm":
            cache["rows"], stats = measure_with_vlm(ctx.model, cfg, suite, ctx.log)
        else:
            cache["rows"] = measure(ctx.model, cfg, suite, ctx.log)
        table = pa.Table.from_pylist(cache["rows"], schema=ITEMS)
        return table.replace_schema_metadata({"stats": json.dumps(stats)}) if stats else table

    p_items = make_plan(STAGE, inputs, cfg, ctx, dataset="benchmark_items", shared_run=SHARED_RUN)
    items_ref = build_plan(p_items, items, ctx, refresh)

    def metrics(_: int) -> pa.Table:
        rows = cache.get("rows") or read(items_ref).to_pylist()
        return pa.Table.from_pylist(summarize(rows, cfg, suite_name), schema=METRICS)

    p_metrics = make_plan(STAGE, {"items": items_ref}, cfg, ctx, dataset="benchmark", shared_run=SHARED_RUN)
    return {"benchmark_items": items_ref, "benchmark": build_plan(p_metrics, metrics, ctx, refresh)}
