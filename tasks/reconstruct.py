"""reconstruct: Cognitive Pattern Reconstruction of the selected rollouts into four kinds of supervision.

    generation   prompt -> the best image                      (accepted prompts)
    caption      best image + an instruction -> its prompt      (several instruction templates)
    judgement    image + prompt -> the model's own reasoning and score, across the whole score range
    reflection   prompt + worst image -> best image             (groups with max > 8 and max - min >= 3)

Counts follow the configured proportions (UniCorn 5:5:3:1) relative to the generation examples available.
A `dpo_pairs` dataset (chosen = best, rejected = worst of each accepted prompt) serves the DPO objective, and a
`groups` dataset (every scored rollout with its advantage within its prompt's group) the GRPO objective.
A share of prompts is held out (`split` = 'heldout') so post-training can report held-out loss per kind.
Every example keeps its lineage: prompt_id and the sample ids it came from.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pyarrow as pa

from configs.schema import ReconstructConfig
from model.judges import check_training_judges
from storage import DatasetRef
from tasks.examples import EXAMPLES, example_row
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read, stable_seed

# a backend without caption templates of its own is asked in plain words
GENERIC_CAPTION_TEMPLATES = ("which prompt made this image", "what prompt drew this picture",
                             "write the prompt of this image")

# the model gives only its caption templates (they enter the fingerprint with the config), not its id
STAGE = StageSpec(name="reconstruct", code_version="2", section="reconstruct",
                  inputs=("prompts", "rollouts", "judgements", "selections"),
                  outputs={"cpr": EXAMPLES, "dpo_pairs": EXAMPLES, "groups": EXAMPLES}, model=False)


def stratified(judged: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Up to n judgements drawn round-robin over score bins (0-2, 3-5, 6-8, 9-10), so low, middle and high
    scores are all represented, not only winners."""
    bins = defaultdict(list)
    for r in judged:
        bins[min(r["score"] // 3, 3)].append(r)
    for b in bins.values():
        rng.shuffle(b)
    out, order = [], sorted(bins)
    while len(out) < n and any(bins[b] for b in order):
        for b in order:
            if bins[b] and len(out) < n:
                out.append(bins[b].pop())
    return out


def build_examples(inputs: dict[str, DatasetRef], cfg: ReconstructConfig, caption_templates) -> dict[str, list]:
    prompts = {r["prompt_id"]: r for r in read(inputs["prompts"], ["prompt_id", "prompt", "category"]).to_pylist()}
    sel = {r["prompt_id"]: r for r in read(inputs["selections"]).to_pylist()}
    judged = read(inputs["judgements"], ["prompt_id", "sample_idx", "score", "reasoning", "parse_ok"]).to_pylist()
    drawn = read(inputs["rollouts"], ["prompt_id", "sample_idx", "image", "temperature", "cfg_scale"]).to_pylist()
    images = {(r["prompt_id"], r["sample_idx"]): r["image"] for r in drawn}
    # the policy that drew each sample: GRPO's ratios are taken under it
    policy = {(r["prompt_id"], r["sample_idx"]): {"temperature": r["temperature"], "cfg_scale": r["cfg_scale"]}
              for r in drawn}
    rng = random.Random(stable_seed(cfg.seed, "reconstruct"))

    def ex(kind, pid, samples, **fields):
        return example_row(cfg, kind, pid, samples, prompts[pid], **fields)

    winners = sorted(pid for pid, s in sel.items()
                     if s["accepted"] and s["max_score"] >= cfg.generation_min_score)
    gen = [ex("generation", pid, [sel[pid]["best_sample_idx"]], input_text=prompts[pid]["prompt"],
              target_image=images[(pid, sel[pid]["best_sample_idx"])], score=sel[pid]["max_score"])
           for pid in winners]
    unit = len(gen) / cfg.mixture["generation"]
    want = {k: round(unit * w) for k, w in cfg.mixture.items()}

    # caption: each winner's image under rotating instruction templates, as many passes as the share asks
    cap = []
    for j in range(want.get("caption", 0)):
        pid = winners[j % len(winners)]
        t = caption_templates[(j // len(winners) + stable_seed(pid)) % len(caption_templates)]
        cap.append(ex("caption", pid, [sel[pid]["best_sample_idx"]], input_text=t,
                      input_image=images[(pid, sel[pid]["best_sample_idx"])], target_text=prompts[pid]["prompt"]))
    cap = list({e["example_id"]: e for e in cap}.values())

    jud = [ex("judgement", r["prompt_id"], [r["sample_idx"]], input_text=prompts[r["prompt_id"]]["prompt"],
              input_image=images[(r["prompt_id"], r["sample_idx"])], target_text=r["reasoning"], score=r["score"])
           for r in stratified([r for r in judged if r["parse_ok"] and r["prompt_id"] in prompts],
                               want.get("judgement", 0), rng)]

    # reflection: from a clearly flawed sample to a clearly good one of the same prompt
    groups = sorted(pid for pid, s in sel.items() if s["max_score"] is not None
                    and s["max_score"] > cfg.reflection_min_best
                    and s["max_score"] - s["min_score"] >= cfg.reflection_min_gap)
    rng.shuffle(groups)
    ref = [ex("reflection", pid, [sel[pid]["worst_sample_idx"], sel[pid]["best_sample_idx"]],
              input_text=prompts[pid]["prompt"], input_image=images[(pid, sel[pid]["worst_sample_idx"])],
              target_image=images[(pid, sel[pid]["best_sample_idx"])],
              score_from=sel[pid]["min_score"], score_to=sel[pid]["max_score"])
           for pid in groups[: want.get("reflection", 0)]]

    dpo = [ex("preference", pid, [sel[pid]["best_sample_idx"], sel[pid]["worst_sample_idx"]],
              input_text=prompts[pid]["prompt"], target_image=images[(pid, sel[pid]["best_sample_idx"])],
              rejected_image=images[(pid, sel[pid]["worst_sample_idx"])],
              chosen_score=sel[pid]["max_score"], rejected_score=sel[pid]["min_score"])
           for pid in winners if sel[pid]["max_score"] > sel[pid]["min_score"]]

    # groups: every scored rollout of every prompt, with its advantage within the prompt's group; a group whose
    # scores are all equal says nothing about which image is better, and trains nothing
    scored = defaultdict(list)
    for r in judged:
        if r["parse_ok"] and r["score"] is not None and r["prompt_id"] in prompts:
            scored[r["prompt_id"]].append(r)
    grp = []
    for pid in sorted(scored):
        rows = sorted(scored[pid], key=lambda r: r["sample_idx"])
        mean = sum(r["score"] for r in rows) / len(rows)
        std = (sum((r["score"] - mean) ** 2 for r in rows) / len(rows)) ** 0.5
        if len(rows) < 2 or std == 0:
            continue
        grp += [ex("group", pid, [r["sample_idx"]], input_text=prompts[pid]["prompt"],
                   target_image=images[(pid, r["sample_idx"])], score=r["score"],
                   advantage=(r["score"] - mean) / std, **policy[(pid, r["sample_idx"])])
                for r in rows]
    return {"cpr": gen + cap + jud + ref, "dpo_pairs": dpo, "groups": grp}


def run(inputs: dict[str, DatasetRef], cfg: ReconstructConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    judges = set(read(inputs["judgements"], ["judge_id"]).column("judge_id").to_pylist())
    # GRPO's advantages and the judgement kind come from these scores, not only select's: the same rule as select's
    check_training_judges("reconstruct", judges)
    templates = tuple(getattr(ctx.model, "caption_templates", GENERIC_CAPTION_TEMPLATES))
    cache: dict[str, list] = {}

    def table(name):
        def make(_: int) -> pa.Table:
            if not cache:
                cache.update(build_examples(inputs, cfg, templates))
            return pa.Table.from_pylist(cache[name], schema=EXAMPLES)
        return make

    refs = {}
    for name in STAGE.outputs:
        # the templates are the model's: they enter the fingerprint with the config
        p = make_plan(STAGE, inputs, {**cfg.model_dump(mode="json"), "caption_templates": list(templates)}, ctx,
                      dataset=name)
        refs[name] = build_plan(p, table(name), ctx, refresh)
    counts = defaultdict(int)
    for k in read(refs["cpr"], ["kind"]).column("kind").to_pylist():
        counts[k] += 1
    ctx.log(f"[reconstruct] {dict(counts)} + {read(refs['dpo_pairs'], ['kind']).num_rows} DPO pairs + "
            f"{read(refs['groups'], ['kind']).num_rows} scored rollouts in groups")
    return refs
