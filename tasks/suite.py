"""suite: the held-out benchmark prompts, as datasets.

`suite` is what the run's benchmark measures (`prompts_per_category` of every category); `heldout` is every prompt
any benchmark size could measure (the suite at its largest size), which propose excludes: it is never proposed, so
never trained on, whatever the backend or the run's benchmark size. Distinct prompts per category, the same for a
given seed; a category keeps at most a sixth of its distinct prompts for the suite, so training keeps most of them.
The largest size is bounded: the suite's first draws are a category's likeliest prompts, and holding out every one
a sixth of a large category allows would take most of what the model proposes there.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pyarrow as pa

from configs.schema import SUITE_MAX_PER_CATEGORY, BenchmarkConfig
from model.vlm import geneval
from storage import DatasetRef
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, stable_seed

SUITE = "shapeworld-heldout-v2"
SHARED_RUN = "benchmarks"  # the suite depends on its config only: one copy, reused by every run

# `questions` (JSON: text, choices, answer per question) only for the real-model suite, whose evaluator answers them
SCHEMA = pa.schema([("prompt_id", pa.string()), ("category", pa.string()), ("prompt", pa.string()),
                    ("suite", pa.string()), ("questions", pa.string())])
STAGE = StageSpec(name="suite", code_version="3", section="benchmark", outputs={"suite": SCHEMA, "heldout": SCHEMA},
                  model=False)


def suite_prompts(cfg: BenchmarkConfig, full: bool = False) -> list[tuple[str, str]]:
    """(category, prompt) of the held-out suite (`full`: at its largest size), in draw order. One rng per
    category, so a smaller suite is a prefix of each category of any larger one."""
    from model.world import CATEGORIES, prompt_count, sample_prompt

    out = []
    for cat in CATEGORIES:
        cap = min(max(1, prompt_count(cat) // 6), SUITE_MAX_PER_CATEGORY)
        want = cap if full else min(cfg.prompts_per_category, cap)
        rng = random.Random(stable_seed(cfg.suite_seed, cat))
        drawn: dict[str, None] = {}
        while len(drawn) < want:
            drawn[sample_prompt(cat, rng)] = None
        out += [(cat, p) for p in drawn]
    return out


def geneval_rows(cfg: BenchmarkConfig, full: bool) -> list[dict]:
    """The GenEval-style suite (model/vlm/geneval.py): its largest size is what its smallest category offers."""
    size = min(*geneval.CAPACITY.values(), SUITE_MAX_PER_CATEGORY) if full else cfg.prompts_per_category
    return [{"prompt_id": str(stable_seed(geneval.SUITE, sp.prompt)), "category": sp.category, "prompt": sp.prompt,
             "suite": geneval.SUITE, "questions": json.dumps([dataclasses.asdict(q) for q in sp.questions])}
            for sp in geneval.suite_prompts(size, cfg.suite_seed)]


def _table(cfg: BenchmarkConfig, full: bool) -> pa.Table:
    if cfg.suite == "geneval":
        return pa.Table.from_pylist(geneval_rows(cfg, full), schema=SCHEMA)
    return pa.Table.from_pylist([{"prompt_id": str(stable_seed(SUITE, p)), "category": c, "prompt": p, "suite": SUITE,
                                  "questions": None} for c, p in suite_prompts(cfg, full)], schema=SCHEMA)


def run(inputs: dict[str, DatasetRef], cfg: BenchmarkConfig, ctx: StageContext,
        refresh: bool = False) -> dict[str, DatasetRef]:
    out = {}
    for name, full in (("suite", False), ("heldout", True)):
        # only what chooses the prompts enters the fingerprint: the full suite is the same at every size
        key = {"suite": {"shapeworld": SUITE, "geneval": geneval.SUITE}[cfg.suite], "suite_seed": cfg.suite_seed,
               "prompts_per_category": None if full else cfg.prompts_per_category}
        p = make_plan(STAGE, inputs, key, ctx, dataset=name, shared_run=SHARED_RUN)
        out[name] = build_plan(p, lambda _, full=full: _table(cfg, full), ctx, refresh)
    return out
