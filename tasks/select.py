"""select: best-of-N rejection sampling with the model's own judgements.

Per prompt, the best-scored sample is kept if its score reaches the threshold; ties are broken by a seeded RNG.
Prompts with no accepted sample go to the discard pool, which the next cycle's propose offers again
(curriculum); accepted prompts with top scores grow the seed library. The model's own judge ('self') selects;
an external VLM judge ('vlm:*') may too, as a teacher (the cycle's report says it is not self-play); the oracle
measures, it never chooses training data.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pyarrow as pa

from configs.schema import SelectConfig
from model.judges import check_training_judges
from storage import DatasetRef
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read, stable_seed

SELECTIONS = pa.schema([("prompt_id", pa.string()), ("best_sample_idx", pa.int32()),
                        ("worst_sample_idx", pa.int32()), ("max_score", pa.int32()), ("min_score", pa.int32()),
                        ("n_scored", pa.int32()), ("accepted", pa.bool_()), ("reason", pa.string())])
POOL = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("category", pa.string()),
                  ("max_score", pa.int32()), ("cycles_tried", pa.int32())])
LIBRARY = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("category", pa.string()),
                     ("score", pa.int32()), ("cycle", pa.int32())])
STAGE = StageSpec(name="select", code_version="1", section="select", inputs=("prompts", "judgements"),
                  optional=("discard_pool", "seed_library"),
                  outputs={"selections": SELECTIONS, "discard_pool": POOL, "seed_library": LIBRARY}, model=False)


def choose(scores: dict[int, int | None], threshold: float, rng: random.Random) -> dict:
    scored = {i: s for i, s in scores.items() if s is not None}
    if not scored:
        return {"best_sample_idx": None, "worst_sample_idx": None, "max_score": None, "min_score": None,
                "n_scored": 0, "accepted": False, "reason": "no parseable judgement"}
    hi, lo = max(scored.values()), min(scored.values())
    best = rng.choice(sorted(i for i, s in scored.items() if s == hi))
    worst = rng.choice(sorted(i for i, s in scored.items() if s == lo))
    ok = hi >= threshold
    return {"best_sample_idx": best, "worst_sample_idx": worst, "max_score": hi, "min_score": lo,
            "n_scored": len(scored), "accepted": ok,
            "reason": f"best score {hi} {'>=' if ok else '<'} threshold {threshold:g}"}


def run(inputs: dict[str, DatasetRef], cfg: SelectConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    """Returns refs of three datasets: selections, discard_pool and seed_library."""
    judged = read(inputs["judgements"], ["prompt_id", "sample_idx", "judge_id", "score"]).to_pylist()
    judges = {r["judge_id"] for r in judged}
    check_training_judges("select", judges)
    prompts = {r["prompt_id"]: r for r in read(inputs["prompts"], ["prompt_id", "prompt", "category"]).to_pylist()}
    scores: dict[str, dict[int, int | None]] = defaultdict(dict)
    for r in judged:
        scores[r["prompt_id"]][r["sample_idx"]] = r["score"]
    chosen = {pid: choose(s, cfg.threshold, random.Random(stable_seed(cfg.seed, pid)))
              for pid, s in sorted(scores.items())}

    def selections(_: int) -> pa.Table:
        return pa.Table.from_pylist([{"prompt_id": pid, **c} for pid, c in chosen.items()], schema=SELECTIONS)

    def discard_pool(_: int) -> pa.Table:
        prev = {r["prompt_id"]: r for r in read(inputs["discard_pool"]).to_pylist()} if "discard_pool" in inputs else {}
        rows = []
        for pid, c in chosen.items():
            tried = prev.get(pid, {}).get("cycles_tried", 0) + 1
            if not c["accepted"] and tried < cfg.pool_max_tries + 1:
                rows.append({"prompt_id": pid, "prompt": prompts[pid]["prompt"], "category": prompts[pid]["category"],
                             "max_score": c["max_score"], "cycles_tried": tried})
        rows += [r for pid, r in prev.items() if pid not in chosen]  # not offered this cycle: keep waiting
        return pa.Table.from_pylist(rows, schema=POOL)

    def seed_library(_: int) -> pa.Table:
        rows = read(inputs["seed_library"]).to_pylist() if "seed_library" in inputs else []
        known = {r["prompt_id"] for r in rows}
        rows += [{"prompt_id": pid, "prompt": prompts[pid]["prompt"], "category": prompts[pid]["category"],
                  "score": c["max_score"], "cycle": ctx.cycle} for pid, c in chosen.items()
                 if c["accepted"] and c["max_score"] >= cfg.seed_min_score and pid not in known]
        by_cat = defaultdict(list)
        for r in rows:
            by_cat[r["category"]].append(r)
        kept = [r for cat in sorted(by_cat) for r in by_cat[cat][-cfg.seeds_per_category:]]
        return pa.Table.from_pylist(kept, schema=LIBRARY)

    refs = {}
    for name, fn in (("selections", selections), ("discard_pool", discard_pool), ("seed_library", seed_library)):
        p = make_plan(STAGE, inputs, cfg, ctx, dataset=name)
        refs[name] = build_plan(p, fn, ctx, refresh)
    accepted = sum(c["accepted"] for c in chosen.values())
    ctx.log(f"[select] {accepted}/{len(chosen)} prompts accepted at threshold {cfg.threshold:g}")
    return refs
