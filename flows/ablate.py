"""`selfplay ablate cpr`: generation-only SFT vs the full CPR mixture vs DPO, on the same self-generated data.

One generation side (propose -> rollout -> judge -> select) from the parent, then three children trained on it,
each benchmarked on the held-out suite beside the parent. UniCorn's ablation predicts that generation-only SFT
erodes understanding and that the CPR mixture holds it while generation improves; this measures it here.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from configs.schema import CycleConfig, ReconstructConfig
from flows.cycle import _child_context, benchmark_task, generate_flow, load_run_state, make_context
from model.loader import resolve_checkpoint_dir
from storage import DatasetRef
from tasks import benchmark, posttrain, reconstruct
from tasks.benchmark import paired_delta
from tasks.common import read
from tasks.report import JUDGE_FIXED, headline_of

FULL_MIXTURE = ReconstructConfig().mixture  # UniCorn's 5:5:3:1, whatever the recipe's own (tiny.yaml: generation only)
ARMS = {
    "gen_only": {"reconstruct": {"mixture": {"generation": 1, "caption": 0, "judgement": 0, "reflection": 0}},
                 "posttrain": {"objective": "sft"}},
    "cpr": {"reconstruct": {"mixture": FULL_MIXTURE}, "posttrain": {"objective": "sft"}},
    # DPO at UniCorn's lr: at the SFT recipe's 5e-5 it overfit the ~200 pairs (16 passes) and lost 17 points
    "dpo": {"reconstruct": {"mixture": FULL_MIXTURE}, "posttrain": {"objective": "dpo", "lr": 1e-5, "min_lr": 1e-6}},
}
KEEP = ("gen_acc_oracle", "und_acc_gt", "non_unification", "judge_oracle_agreement", "unicycle_soft",
        "best_of_n_self", "und_acc_perturbed")


def _ci95(delta: dict) -> list[float]:
    return [round(delta["ci_low"], 4), round(delta["ci_high"], 4)]


def _arm_config(cfg: CycleConfig, arm: dict[str, Any]) -> CycleConfig:
    return cfg.model_copy(update={
        "reconstruct": cfg.reconstruct.model_copy(update=arm["reconstruct"]),
        "posttrain": cfg.posttrain.model_copy(update=arm["posttrain"])})


@flow(name="selfplay-ablate-cpr", log_prints=True)
def ablate_cpr_flow(config: CycleConfig, cpr_mixture: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """`cpr_mixture` replaces UniCorn's 5:5:3:1 in the cpr arm (e.g. without reflection)."""
    ctx = make_context(config)
    generate_flow(config)
    refs = {k: DatasetRef.model_validate(v) for k, v in load_run_state(config.run.store, config.run.name)["refs"].items()}
    parent_dir = resolve_checkpoint_dir(config.model, config.run.store)
    base = benchmark_task("base", config, ctx)
    base_items = read(base["benchmark_items"]).to_pylist()
    base_m = {k: v for k, v in headline_of(base["benchmark"]).items() if k in KEEP}
    out = {"base": {"checkpoint_id": ctx.model_id, **base_m, JUDGE_FIXED: base_m["judge_oracle_agreement"]}}
    for name, arm in ARMS.items():
        if name == "cpr" and cpr_mixture is not None:
            arm = {**arm, "reconstruct": {"mixture": cpr_mixture}}
        cfg = _arm_config(config, arm)
        cpr = reconstruct.run({k: refs[k] for k in ("prompts", "rollouts", "judgements", "selections")},
                              cfg.reconstruct, ctx)
        trained = posttrain.run(cpr, cfg.posttrain, ctx, parent_dir, cfg.model.registry_line)
        child_cfg, child_ctx = _child_context(cfg, ctx, trained["dir"])
        bench = benchmark_task(name, child_cfg, child_ctx)
        m = headline_of(bench["benchmark"])
        # same prompts and seeds as the base: a paired interval says whether the change is more than noise
        d = paired_delta(base_items, read(bench["benchmark_items"]).to_pylist(), "gen_acc_oracle", config.benchmark)
        # the arm's judge on the base's images: its own images differ, this holds them fixed
        judge = benchmark.judge_on_images(base["benchmark_items"], child_cfg.benchmark, child_ctx)
        out[name] = {"checkpoint_id": trained["checkpoint_id"], **{k: v for k, v in m.items() if k in KEEP},
                     JUDGE_FIXED: judge["judge_oracle_agreement"], "gen_acc_oracle_delta_ci95": _ci95(d),
                     f"{JUDGE_FIXED}_delta_ci95": _ci95(judge["delta"]),
                     "train_examples": trained["metrics"]["train_examples"], "mixture": cfg.reconstruct.mixture}
    return out
