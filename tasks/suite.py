"""suite: the held-out benchmark prompts, as a dataset.

Every checkpoint is benchmarked on it and propose takes it as an input to exclude: it is never proposed, so
never trained on, whatever the backend. Distinct prompts per category, the same for a given seed; a small
category keeps at most a sixth of its prompts for the suite, so training keeps most of it.
"""

from __future__ import annotations

import random

import pyarrow as pa

from configs.schema import BenchmarkConfig
from storage import DatasetRef
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, stable_seed

SUITE = "shapeworld-heldout-v1"
SHARED_RUN = "benchmarks"  # the suite depends on its config only: one copy, reused by every run

SCHEMA = pa.schema([("prompt_id", pa.string()), ("category", pa.string()), ("prompt", pa.string()),
                    ("suite", pa.string())])
STAGE = StageSpec(name="suite", code_version="1", section="benchmark", outputs={"suite": SCHEMA}, model=False)


def suite_prompts(cfg: BenchmarkConfig) -> list[tuple[str, str]]:
    """(category, prompt) of the held-out suite."""
    from model.world import CATEGORIES, prompt_count, sample_prompt

    rng = random.Random(cfg.suite_seed)
    out = []
    for cat in CATEGORIES:
        want = min(cfg.prompts_per_category, max(1, prompt_count(cat) // 6))
        seen: set[str] = set()
        while len(seen) < want:
            seen.add(sample_prompt(cat, rng))
        out += [(cat, p) for p in sorted(seen)]
    return out


def run(inputs: dict[str, DatasetRef], cfg: BenchmarkConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    # only what chooses the prompts enters the fingerprint
    key = {"suite": SUITE, "prompts_per_category": cfg.prompts_per_category, "suite_seed": cfg.suite_seed}

    def table(_: int) -> pa.Table:
        return pa.Table.from_pylist([{"prompt_id": str(stable_seed(SUITE, p)), "category": c, "prompt": p,
                                      "suite": SUITE} for c, p in suite_prompts(cfg)], schema=SCHEMA)

    p = make_plan(STAGE, inputs, key, ctx, shared_run=SHARED_RUN)
    return {"suite": build_plan(p, table, ctx, refresh)}
