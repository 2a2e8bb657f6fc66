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
(metric rows with bootstrap 95 % intervals over prompts).

`judge_on_images` re-judges another checkpoint's benchmark images with this model. A child draws different
images from its parent, so its judge_oracle_agreement mixes a change of judge with a change of what is judged;
on the parent's images, only the judge differs.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
from configs.schema import BenchmarkConfig
from storage import DatasetRef, from_png, to_png
from tasks.common import StageContext, make_plan, read, run_stage, stable_seed

NAME = "benchmark"
CODE_VERSION = "2"  # 2: items keep their images (PNG) for judge_on_images
SUITE = "shapeworld-heldout-v1"
SHARED_RUN = "benchmarks"  # a checkpoint's benchmark is the same in every run: one copy, reused by all


def suite_prompts(cfg: BenchmarkConfig) -> list[tuple[str, str]]:
    """(category, prompt) of the held-out suite: distinct prompts, the same for a given seed."""
    from model.world import CATEGORIES, prompt_count, sample_prompt

    rng = random.Random(cfg.suite_seed)
    out = []
    for cat in CATEGORIES:
        # a small category keeps at most a sixth of its prompts for the suite, so training keeps most of it
        want = min(cfg.prompts_per_category, max(1, prompt_count(cat) // 6))
        seen: set[str] = set()
        while len(seen) < want:
            seen.add(sample_prompt(cat, rng))
        out += [(cat, p) for p in sorted(seen)]
    return out


def suite_canonical(cfg: BenchmarkConfig | None = None) -> set[str]:
    """The suite's prompts in canonical form: propose drops these, so the suite stays held out."""
    from model.world import parse

    return {parse(p).spec.to_text() for _, p in suite_prompts(cfg or BenchmarkConfig())}


ITEMS = pa.schema([("prompt_id", pa.string()), ("category", pa.string()), ("prompt", pa.string()),
                   ("oracle_ok", pa.list_(pa.bool_())), ("self_score", pa.list_(pa.int32())),
                   ("unicycle_soft", pa.float64()), ("unicycle_hard", pa.float64()),
                   ("und_true", pa.float64()), ("und_perturbed", pa.float64()), ("checkpoint_id", pa.string()),
                   ("images", pa.list_(pa.binary()))])
METRICS = pa.schema([("suite", pa.string()), ("metric", pa.string()), ("category", pa.string()),
                     ("checkpoint_id", pa.string()), ("value", pa.float64()), ("ci_low", pa.float64()),
                     ("ci_high", pa.float64()), ("n", pa.int64())])


def measure(model, cfg: BenchmarkConfig, log=print) -> list[dict]:
    """One row per suite prompt with everything the metrics need."""
    from model.world import answer, facts, grade, parse, perturb, questions, render, sample_scene, verify

    items = suite_prompts(cfg)
    prompts = [p for _, p in items]
    pids = [str(stable_seed(SUITE, p)) for p in prompts]
    flat = [(i, s) for i in range(len(prompts)) for s in range(cfg.samples)]
    seeds = [stable_seed(cfg.suite_seed, pids[i], s) for i, s in flat]
    images = model.generate([prompts[i] for i, _ in flat], seeds, [cfg.cfg_scale] * len(flat),
                            temperature=cfg.temperature)
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
        rows.append({"prompt_id": pids[i], "category": cat, "prompt": p, "oracle_ok": oracle[sl],
                     "self_score": [j.score if j.parse_ok else -1 for j in own[sl]],
                     "unicycle_soft": float(np.mean(credit[i])) if credit[i] else 0.0,
                     "unicycle_hard": float(all(c == 1.0 for c in credit[i])) if credit[i] else 0.0,
                     "und_true": float(np.mean(und[(i, "true")])), "und_perturbed": float(np.mean(und[(i, "perturbed")])),
                     "checkpoint_id": model.model_id, "images": [to_png(im) for im in images[sl]]})
    return rows


def rejudge(model, rows: list[dict]) -> list[dict]:
    """`rows` (benchmark items of any checkpoint) with their images scored by `model`'s judge instead.

    Everything but self_score and checkpoint_id stays the images' author's, so only the judge metrics
    (judge_oracle_agreement, non_unification, best_of_n_self) of the result are the model's."""
    flat = [(i, s) for i, r in enumerate(rows) for s in range(len(r["images"] or []))]
    if len(flat) != sum(len(r["oracle_ok"]) for r in rows):
        raise ValueError("rejudge: these benchmark items carry no images (benchmarked before items kept them)")
    own = model.judge([rows[i]["prompt"] for i, _ in flat], [from_png(rows[i]["images"][s]) for i, s in flat], None)
    scores: list[list[int]] = [[] for _ in rows]
    for (i, _), j in zip(flat, own):
        scores[i].append(j.score if j.parse_ok else -1)
    return [{**r, "self_score": scores[i], "checkpoint_id": model.model_id, "images": None}
            for i, r in enumerate(rows)]


def per_prompt(rows: list[dict], threshold: float) -> dict[str, np.ndarray]:
    """Per-prompt values of each metric (means over that prompt's samples), aligned with `rows`."""
    ok = np.array([r["oracle_ok"] for r in rows], dtype=float)
    score = np.array([r["self_score"] for r in rows], dtype=float)
    rej = score < threshold
    best = np.argmax(np.where(score < 0, -np.inf, score), axis=1)
    return {
        "gen_acc_oracle": ok.mean(1),
        "best_of_n_self": ok[np.arange(len(rows)), best],
        "pass_at_n_oracle": ok.max(1),
        "non_unification": rej.mean(1),
        "judge_oracle_agreement": ((~rej) == ok.astype(bool)).mean(1),
        "unicycle_soft": np.array([r["unicycle_soft"] for r in rows]),
        "unicycle_hard": np.array([r["unicycle_hard"] for r in rows]),
        "und_acc_gt": np.array([r["und_true"] for r in rows]),
        "und_acc_perturbed": np.array([r["und_perturbed"] for r in rows]),
        # ratio metric: rejected images the oracle also rejects (weights per image, not per prompt)
        "_rejected": rej.sum(1), "_weak": (rej & ~ok.astype(bool)).sum(1),
    }


def bootstrap_ci(values: np.ndarray, reps: int, seed: int, weights: np.ndarray | None = None) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    if weights is None:
        stats = values[idx].mean(1)
    else:
        w = weights[idx]
        stats = np.where(w.sum(1) > 0, (values[idx]).sum(1) / np.maximum(w.sum(1), 1e-9), np.nan)
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def summarize(rows: list[dict], cfg: BenchmarkConfig) -> list[dict]:
    out = []
    cats = sorted({r["category"] for r in rows})
    for cat in ["all", *cats]:
        sel = [r for r in rows if cat == "all" or r["category"] == cat]
        v = per_prompt(sel, cfg.threshold)
        for metric, arr in v.items():
            if metric.startswith("_"):
                continue
            lo, hi = bootstrap_ci(arr, cfg.bootstrap, stable_seed(metric, cat))
            out.append({"metric": metric, "category": cat, "value": float(arr.mean()), "ci_low": lo, "ci_high": hi,
                        "n": len(arr)})
        rejected = v["_rejected"].sum()
        if rejected:
            lo, hi = bootstrap_ci(v["_weak"].astype(float), cfg.bootstrap, stable_seed("weak", cat), v["_rejected"])
            out.append({"metric": "weak_generation_share", "category": cat, "value": float(v["_weak"].sum() / rejected),
                        "ci_low": lo, "ci_high": hi, "n": int(rejected)})
    ckpt = rows[0]["checkpoint_id"] if rows else ""
    return [{"suite": SUITE, "checkpoint_id": ckpt, **r} for r in out]


def paired_delta(parent: list[dict], child: list[dict], metric: str, cfg: BenchmarkConfig) -> dict:
    """Child minus parent on the same prompts and seeds, with a paired bootstrap 95 % interval."""
    by = {r["prompt_id"]: r for r in child}
    pairs = [(r, by[r["prompt_id"]]) for r in parent if r["prompt_id"] in by]
    a = per_prompt([p for p, _ in pairs], cfg.threshold)[metric]
    b = per_prompt([c for _, c in pairs], cfg.threshold)[metric]
    lo, hi = bootstrap_ci(b - a, cfg.bootstrap, stable_seed("delta", metric))
    return {"metric": metric, "delta": float((b - a).mean()), "ci_low": lo, "ci_high": hi, "n": len(pairs)}


def headline(metric_rows: list[dict]) -> dict[str, float]:
    """The overall value of each metric: what reports and the promotion gate read."""
    return {r["metric"]: round(r["value"], 4) for r in metric_rows if r["category"] == "all"}


def run(cfg: BenchmarkConfig, ctx: StageContext, refresh: bool = False) -> dict[str, DatasetRef]:
    """Benchmark the context's model; cached per (checkpoint, suite config)."""
    cache: dict[str, list] = {}

    def items(_: int) -> pa.Table:
        cache["rows"] = measure(ctx.model, cfg, ctx.log)
        return pa.Table.from_pylist(cache["rows"], schema=ITEMS)

    p_items = make_plan(NAME, {}, cfg, ctx, CODE_VERSION, n_parts=1, dataset="benchmark_items",
                        shared_run=SHARED_RUN)
    items_ref = run_stage(p_items, items, ctx, refresh)

    def metrics(_: int) -> pa.Table:
        rows = cache.get("rows") or read(items_ref).to_pylist()
        return pa.Table.from_pylist(summarize(rows, cfg), schema=METRICS)

    p_metrics = make_plan(NAME, {"items": items_ref}, cfg, ctx, CODE_VERSION, n_parts=1, uses_model=False,
                          dataset="benchmark", shared_run=SHARED_RUN)
    return {"benchmark_items": items_ref, "benchmark": run_stage(p_metrics, metrics, ctx, refresh)}


def judge_on_images(items: DatasetRef, cfg: BenchmarkConfig, ctx: StageContext, refresh: bool = False) -> dict:
    """The context's judge on the images of `items` (another checkpoint's benchmark), cached, and the paired
    change of judge_oracle_agreement from that checkpoint's own judge to this one on the same images."""
    p = make_plan(NAME, {"items": items}, cfg, ctx, CODE_VERSION, n_parts=1, dataset="judge_on_images",
                  shared_run=SHARED_RUN)
    author = read(items).to_pylist()
    ref = run_stage(p, lambda _: pa.Table.from_pylist(rejudge(ctx.model, author), schema=ITEMS), ctx, refresh)
    judged = read(ref).to_pylist()
    d = paired_delta(author, judged, "judge_oracle_agreement", cfg)
    value = float(per_prompt(judged, cfg.threshold)["judge_oracle_agreement"].mean())
    return {"judge_on_images": ref, "images_of": author[0]["checkpoint_id"] if author else None,
            "judge_oracle_agreement": round(value, 4), "delta": d}
