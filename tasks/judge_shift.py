"""judge_shift: this model's judge on another checkpoint's benchmark images.

A child draws different images from its parent, so its judge_oracle_agreement mixes a change of judge with
a change of what is judged; on the parent's images only the judge differs. Everything in a row but
self_score and checkpoint_id stays the images' author's, so only the judge metrics (judge_oracle_agreement,
non_unification, best_of_n_self) of the result are this model's.
"""

from __future__ import annotations

import pyarrow as pa

from configs.schema import BenchmarkConfig
from storage import DatasetRef, from_png
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read
from tasks.stats import ITEMS

SHARED_RUN = "benchmarks"  # the same judge on the same images gives the same scores in every run
STAGE = StageSpec(name="judge_shift", code_version="2", section="benchmark", inputs=("benchmark_items",),
                  outputs={"judge_on_images": ITEMS})


def rejudge(model, rows: list[dict]) -> list[dict]:
    """`rows` (benchmark items of any checkpoint) with their images scored by `model`'s judge instead."""
    flat = [(i, s) for i, r in enumerate(rows) for s in range(len(r["images"] or []))]
    if len(flat) != sum(len(r["evaluator_ok"]) for r in rows):
        raise ValueError("judge_shift: these benchmark items carry no images (benchmarked before items kept them)")
    own = model.judge([rows[i]["prompt"] for i, _ in flat], [from_png(rows[i]["images"][s]) for i, s in flat], None)
    scores: list[list[int]] = [[] for _ in rows]
    for (i, _), j in zip(flat, own):
        scores[i].append(j.score if j.parse_ok else -1)
    return [{**r, "self_score": scores[i], "checkpoint_id": model.model_id, "images": None}
            for i, r in enumerate(rows)]


def run(inputs: dict[str, DatasetRef], cfg: BenchmarkConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    def table(_: int) -> pa.Table:
        return pa.Table.from_pylist(rejudge(ctx.model, read(inputs["benchmark_items"]).to_pylist()), schema=ITEMS)

    p = make_plan(STAGE, inputs, cfg, ctx, shared_run=SHARED_RUN)
    return {"judge_on_images": build_plan(p, table, ctx, refresh)}
