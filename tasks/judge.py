"""judge: a reasoning text and a 0-10 score for every rollout image, under a per-category rubric.

The judge is chosen by config: 'self' is the model's own understanding (the only judge whose scores may feed
training); 'oracle' is the embedded world's exact oracle, for measuring only. An output that does not parse
is kept with parse_ok = false and a null score, and counted, never fatal.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from configs.loader import canonical_json
from configs.schema import JudgeConfig
from model.judges import make_judge
from storage import Dataset, DatasetRef, from_png
from tasks.stage import StageContext, StagePlan, StageSpec, config_dict, make_plan, read

SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("judge_id", pa.string()),
                    ("rubric", pa.string()), ("reasoning", pa.string()), ("score", pa.int32()),
                    ("parse_ok", pa.bool_()), ("raw", pa.string())])
STAGE = StageSpec(name="judge", code_version="1", section="judge", inputs=("prompts", "rollouts"),
                  outputs={"judgements": SCHEMA}, sharded=True)


def plan(inputs: dict[str, DatasetRef], cfg: JudgeConfig, ctx: StageContext) -> StagePlan:
    n = len(Dataset(inputs["rollouts"]).manifest().parts)  # one judge shard per rollout part
    # only the model's own judge depends on the checkpoint
    ctx_ = ctx if cfg.judge == "self" else dataclasses.replace(ctx, model_id=None)
    # batch size is speed only; an unset vlm section keeps the fingerprints judges had before it existed
    key = {k: v for k, v in config_dict(cfg).items() if k != "batch_size" and not (k == "vlm" and v is None)}
    return make_plan(STAGE, inputs, key, ctx_, n_parts=n, cfg=cfg)


def compute_part(p: StagePlan, i: int, ctx: StageContext) -> pa.Table:
    cfg: JudgeConfig = p.extra["cfg"]
    judge = make_judge(cfg.judge, ctx, cfg.vlm)
    rollouts = Dataset(p.inputs["rollouts"]).read_part(i, ["prompt_id", "sample_idx", "image"]).to_pylist()
    text = {r["prompt_id"]: r["prompt"] for r in read(p.inputs["prompts"], ["prompt_id", "prompt"]).to_pylist()}
    rubric_text = canonical_json(cfg.rubric)
    rows = []
    for j in range(0, len(rollouts), cfg.batch_size):
        batch = rollouts[j:j + cfg.batch_size]
        verdicts = judge.judge([text[r["prompt_id"]] for r in batch], [from_png(r["image"]) for r in batch],
                               cfg.rubric)
        rows += [{"prompt_id": r["prompt_id"], "sample_idx": r["sample_idx"], "judge_id": judge.judge_id,
                  "rubric": rubric_text, "reasoning": v.reasoning, "score": v.score if v.parse_ok else None,
                  "parse_ok": v.parse_ok, "raw": v.raw} for r, v in zip(batch, verdicts)]
    unparsed = sum(not r["parse_ok"] for r in rows)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({"stats": json.dumps({"judged": len(rows), "unparsed": unparsed})})

