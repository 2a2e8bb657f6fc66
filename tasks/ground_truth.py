"""ground_truth: the ceiling reference line, not self-play.

The prompts self-play trained on (select's accepted prompts at `reconstruct.generation_min_score`), each with one
true render of the prompt drawn by the world instead of the self-judged best image, as generation examples.
Post-trained for the same steps, it bounds what self-play's own images can give the model. The world's renderer
makes these images, so this stage belongs to the ablation's `ceiling` arm only: no self-play DAG contains it.
"""

from __future__ import annotations

import random

import pyarrow as pa

from configs.schema import ReconstructConfig
from storage import DatasetRef, to_png
from tasks.examples import EXAMPLES, example_row
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read, stable_seed

STAGE = StageSpec(name="ground_truth", code_version="1", section="reconstruct", inputs=("prompts", "selections"),
                  outputs={"cpr": EXAMPLES, "dpo_pairs": EXAMPLES, "groups": EXAMPLES}, model=False)


def true_renders(inputs: dict[str, DatasetRef], cfg: ReconstructConfig) -> list[dict]:
    from model.world import parse, render, sample_scene, verify

    prompts = {r["prompt_id"]: r for r in read(inputs["prompts"], ["prompt_id", "prompt", "category"]).to_pylist()}
    rows = []
    for s in sorted(read(inputs["selections"]).to_pylist(), key=lambda r: r["prompt_id"]):
        if not (s["accepted"] and s["max_score"] >= cfg.generation_min_score):
            continue
        pid, text = s["prompt_id"], prompts[s["prompt_id"]]["prompt"]
        image = render(sample_scene(parse(text).spec, random.Random(stable_seed(cfg.seed, "truth", pid))))
        if not verify(text, image).ok:  # a true render the oracle misreads would teach a wrong image
            continue
        rows.append(example_row(cfg, "generation", pid, [], prompts[pid], input_text=text,
                                target_image=to_png(image), source="world_render"))
    return rows


def run(inputs: dict[str, DatasetRef], cfg: ReconstructConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    cache: list[dict] = []

    def cpr(_: int) -> pa.Table:
        cache.extend(true_renders(inputs, cfg))
        return pa.Table.from_pylist(cache, schema=EXAMPLES)

    # no pairs and no groups: only their names, so a posttrain node binds every input to this stage
    refs = {name: build_plan(make_plan(STAGE, inputs, cfg, ctx, dataset=name),
                             cpr if name == "cpr" else lambda _: EXAMPLES.empty_table(), ctx, refresh)
            for name in STAGE.outputs}
    ctx.log(f"[ground_truth] {read(refs['cpr'], ['kind']).num_rows} true renders of the accepted prompts "
            "(the ceiling reference, not self-play)")
    return refs
