"""gate: promote the child only if generation improves and understanding holds.

Paired differences on the same suite prompts and seeds: the child must beat the parent's `gate.metric` by more
than `min_gain` (and, if asked, with the 95 % interval above 0), and `understanding_metric` must not fall by
more than the tolerance. The decision, the metrics of both and the judge's own change (on the parent's images)
are written as a one-row `gate` dataset; the registry gets both checkpoints' metrics, and the promoted pointer
moves to a passing child unless `gate.promote` is off or this is a rerun of a recorded cycle.
"""

from __future__ import annotations

import json

import pyarrow as pa

from configs.schema import BenchmarkConfig, GateConfig
from storage import DatasetRef, Registry
from tasks.stage import StageContext, StageSpec, build_plan, make_plan, read, read_row
from tasks.stats import evaluator_name, headline, paired_delta, per_prompt

# the judge on the parent's images (a child's own images differ from its parent's: this holds them fixed)
JUDGE_FIXED = "judge_agreement_on_parent_images"
GATE = pa.schema([("parent", pa.string()), ("child", pa.string()), ("passed", pa.bool_()), ("reason", pa.string()),
                  ("parent_metrics", pa.string()), ("child_metrics", pa.string()), ("deltas", pa.string())])
JSON_COLUMNS = ("parent_metrics", "child_metrics", "deltas")
STAGE = StageSpec(name="gate", code_version="1", section=("gate", "benchmark"),
                  inputs=("parent_items", "child_items", "parent_benchmark", "child_benchmark", "judge_on_images",
                          "checkpoint"),
                  outputs={"gate": GATE}, model=False)


def decide(parent_items: list[dict], child_items: list[dict], cfg: GateConfig,
           bcfg: BenchmarkConfig) -> tuple[bool, str, dict]:
    d_gen = paired_delta(parent_items, child_items, cfg.metric, bcfg)
    d_und = paired_delta(parent_items, child_items, cfg.understanding_metric, bcfg)
    reasons = []
    if not d_gen["delta"] > cfg.min_gain:
        reasons.append(f"{cfg.metric} changed by {d_gen['delta']:+.4f} (needs > {cfg.min_gain:+.4f})")
    if cfg.require_significant and not d_gen["ci_low"] > 0:
        reasons.append(f"{cfg.metric} gain not significant (95 % CI [{d_gen['ci_low']:+.4f}, {d_gen['ci_high']:+.4f}])")
    if d_und["delta"] < -cfg.max_understanding_drop:
        reasons.append(f"{cfg.understanding_metric} fell by {-d_und['delta']:.4f} (tolerance {cfg.max_understanding_drop})")
    ok = not reasons
    why = ("promoted: " if ok else "not promoted: ") + ("; ".join(reasons) if reasons else
                                                         f"{cfg.metric} {d_gen['delta']:+.4f}, "
                                                         f"{cfg.understanding_metric} {d_und['delta']:+.4f}")
    return ok, why, {"gen": d_gen, "und": d_und}


def _decision(inputs: dict[str, DatasetRef], cfg: dict) -> dict:
    g, b = cfg["gate"], cfg["benchmark"]
    parent_items = read(inputs["parent_items"]).to_pylist()
    child_items = read(inputs["child_items"]).to_pylist()
    judged = read(inputs["judge_on_images"]).to_pylist()
    parent_m, child_m = headline(read(inputs["parent_benchmark"]).to_pylist()), headline(
        read(inputs["child_benchmark"]).to_pylist())
    agreement = f"judge_{evaluator_name(parent_items)}_agreement"  # with the benchmark's evaluator
    parent_m[JUDGE_FIXED] = parent_m[agreement]  # on its own images, which are the fixed ones
    child_m[JUDGE_FIXED] = round(float(per_prompt(judged, b.threshold)[agreement].mean()), 4)
    passed, why, deltas = decide(parent_items, child_items, g, b)
    deltas["judge"] = paired_delta(parent_items, judged, agreement, b)
    child = read_row(inputs["checkpoint"])["checkpoint_id"]
    return {"parent": parent_items[0]["checkpoint_id"], "child": child, "passed": passed, "reason": why,
            "parent_metrics": json.dumps(parent_m), "child_metrics": json.dumps(child_m), "deltas": json.dumps(deltas)}


def run(inputs: dict[str, DatasetRef], cfg: dict, ctx: StageContext, refresh: bool = False) -> dict[str, DatasetRef]:
    p = make_plan(STAGE, inputs, cfg, ctx)
    ref = build_plan(p, lambda _: pa.Table.from_pylist([_decision(inputs, cfg)], schema=GATE), ctx, refresh)
    d = decision_of(ref)
    reg = Registry(ctx.store, ctx.registry_line)
    reg.update_metrics(d["child"], {"benchmark": d["child_metrics"], "gate": d["reason"]})
    reg.update_metrics(d["parent"], {"benchmark": d["parent_metrics"]})
    if d["passed"] and cfg["gate"].promote and not ctx.replay:
        reg.promote(d["child"])
    elif d["passed"]:
        ctx.log(f"[gate] {d['child']} passes; the promoted pointer stays (" +
                ("a rerun of a recorded cycle)" if ctx.replay else "gate.promote is off)"))
    return {"gate": ref}


def decision_of(ref: DatasetRef) -> dict:
    """The gate's row with its JSON columns decoded."""
    return read_row(ref, JSON_COLUMNS)
