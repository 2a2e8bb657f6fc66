"""`selfplay ablate cpr`: generation-only SFT vs the full CPR mixture vs DPO vs GRPO, on the same self-generated
data, and (`--arm ceiling`) SFT on true renders of the same prompts as a reference that is not self-play.

One generation side from the parent, then one child per arm trained on it (flows/dags.py `ablation`), each
benchmarked beside the parent, its judge measured on the parent's images, and its gate decided without moving
the promoted pointer. UniCorn's ablation predicts that generation-only SFT erodes understanding and that the
CPR mixture holds it while generation improves; this measures it here.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from configs.schema import CycleConfig
from flows.dags import ARM_EXAMPLES, ARMS, DEFAULT_ARMS, ablation
from flows.runner import run_dag
from tasks.gate import JUDGE_FIXED, decision_of
from tasks.posttrain import child_of

FULL_MIXTURE = ARMS["cpr"]["reconstruct"]["mixture"]  # UniCorn's 5:5:3:1, whatever the recipe's own
KEEP = ("gen_acc_oracle", "und_acc_gt", "non_unification", "judge_oracle_agreement", "unicycle_soft",
        "best_of_n_self", "und_acc_perturbed", JUDGE_FIXED)


def ci95(delta: dict) -> list[float]:
    return [round(delta["ci_low"], 4), round(delta["ci_high"], 4)]


def arms_with(cpr_mixture: dict[str, float] | None, names: tuple[str, ...] | list[str] = DEFAULT_ARMS
              ) -> dict[str, dict]:
    """The named arms of the ablation, the cpr arm with `cpr_mixture` (if given) instead of UniCorn's."""
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise ValueError(f"ablation arms {unknown or '(none)'}: the arms are {', '.join(ARMS)}")
    arms = {k: dict(ARMS[k]) for k in dict.fromkeys(names)}
    if cpr_mixture is not None and "cpr" in arms:
        arms["cpr"]["reconstruct"] = {"mixture": cpr_mixture}
    return arms


@flow(name="selfplay-ablate-cpr", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def ablate_cpr_flow(config: CycleConfig, cpr_mixture: dict[str, float] | None = None,
                    arms: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """`cpr_mixture` replaces UniCorn's 5:5:3:1 in the cpr arm (e.g. without reflection); `arms` names the arms
    (default: gen_only, cpr, dpo, grpo; `ceiling` trains on true renders, a reference that is not self-play)."""
    arms = arms_with(cpr_mixture, arms or DEFAULT_ARMS)
    record = run_dag(ablation(arms), config)
    out: dict[str, dict[str, Any]] = {}
    for name, arm in arms.items():
        gate = decision_of(record.outputs(f"gate_{name}")["gate"])
        if not out:  # the parent, as every arm's gate saw it
            out["base"] = {"checkpoint_id": gate["parent"], **{k: gate["parent_metrics"].get(k) for k in KEEP}}
        trained = child_of(record.outputs(f"posttrain_{name}")["checkpoint"])
        out[name] = {"checkpoint_id": gate["child"], **{k: gate["child_metrics"].get(k) for k in KEEP},
                     "gen_acc_oracle_delta_ci95": ci95(gate["deltas"]["gen"]),
                     f"{JUDGE_FIXED}_delta_ci95": ci95(gate["deltas"]["judge"]),
                     "train_examples": trained["metrics"]["train_examples"],
                     "mixture": arm["reconstruct"]["mixture"], "self_play": name not in ARM_EXAMPLES}
    return out
