"""Held-out evaluation of an embedded checkpoint against the world's exact oracle.

Metrics (on a fixed prompt set: `n_prompts` prompts spread evenly over the categories, from `seed`):
- und_acc_gt: the model's yes/no answers to every fact question of each prompt, on a true image of it.
- gen_acc_oracle (overall and per category): share of its own images that the oracle passes.
- non_unification: share of its own images that its own judge scores below the threshold (7).
- judge_oracle_agreement: share of its own images where (own score >= 7) == (oracle passes).
- weak_generation_share: of the images its own judge rejects, the share the oracle also rejects.
"""

from __future__ import annotations

import random
import time

import numpy as np


def heldout_prompts(n: int, seed: int = 20261122) -> list[tuple[str, str]]:
    """(category, prompt) pairs, n spread evenly over the categories, the same for a given (n, seed)."""
    from model.world import CATEGORIES, sample_prompt
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        p = sample_prompt(cat, rng)
        out.append((cat, p if isinstance(p, str) else p.text))
    return out


def understanding_accuracy(model, prompts: list[str], seed: int) -> tuple[float, int]:
    from model.world import parse, render, sample_scene, verify
    rng = random.Random(seed)
    imgs, qs, owner, truth = [], [], [], []
    for i, p in enumerate(prompts):
        spec = parse(p).spec
        img = render(sample_scene(spec, rng))
        v = verify(p, img)
        imgs.append(img)
        for f, ok in zip(v.facts, v.fact_ok):
            qs.append(model.text_ids(f.question))
            owner.append(i)
            truth.append(f.expected if ok else ("no" if f.expected == "yes" else "yes"))
    py = model.yes_prob(model.image_codes(imgs), qs, owner).numpy()
    said = np.where(py >= 0.5, "yes", "no")
    return float((said == np.array(truth)).mean()), len(qs)


def evaluate(model, n_prompts: int = 500, seed: int = 20261122, samples: int = 1, cfg_scale: float | None = None,
             temperature: float | None = None, top_k: int | None = None, threshold: int = 7,
             rubric=None) -> dict:
    from model.world import verify
    t0 = time.perf_counter()
    sp = model.config.sampling
    cfg_scale = sp.cfg_scale if cfg_scale is None else cfg_scale
    temperature = sp.temperature if temperature is None else temperature
    top_k = sp.top_k if top_k is None else top_k
    items = heldout_prompts(n_prompts, seed)
    prompts = [p for _, p in items]
    und, n_q = understanding_accuracy(model, prompts, seed + 1)
    gp = [p for p in prompts for _ in range(samples)]
    gc = [c for c, _ in items for _ in range(samples)]
    seeds = [seed * 1000 + i for i in range(len(gp))]
    t1 = time.perf_counter()
    imgs = model.generate(gp, seeds, [cfg_scale] * len(gp), temperature=temperature, top_k=top_k)
    t2 = time.perf_counter()
    js = model.judge(gp, imgs, rubric)
    t3 = time.perf_counter()
    oracle = np.array([verify(p, im).ok for p, im in zip(gp, imgs)])
    own_ok = np.array([(j.score is not None and j.score >= threshold) for j in js])
    per_cat = {}
    for c in dict.fromkeys(gc):
        m = np.array([x == c for x in gc])
        per_cat[c] = round(float(oracle[m].mean()), 4)
    rej = ~own_ok
    return {
        "und_acc_gt": round(und, 4),
        "gen_acc_oracle": round(float(oracle.mean()), 4),
        "gen_acc_oracle_per_category": per_cat,
        "non_unification": round(float(rej.mean()), 4),
        "judge_oracle_agreement": round(float((own_ok == oracle).mean()), 4),
        "weak_generation_share": round(float((~oracle[rej]).mean()), 4) if rej.any() else None,
        "own_accept_precision": round(float(oracle[own_ok].mean()), 4) if own_ok.any() else None,
        "n_prompts": n_prompts, "samples_per_prompt": samples, "n_images": len(gp), "n_questions": n_q,
        "seed": seed, "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k,
        "checkpoint_id": model.model_id,
        "gen_s": round(t2 - t1, 2), "judge_s": round(t3 - t2, 2), "total_s": round(time.perf_counter() - t0, 2),
    }
