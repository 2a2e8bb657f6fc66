"""One full cycle as a real Prefect flow run on the embedded model: JSON summary, registry lineage, gate, report,
cache on a second run; and the nightly flow chaining cycles through the promoted pointer and discard pool."""

import json
from pathlib import Path

import pytest

from configs.schema import CycleConfig
from flows.cycle import cycle_flow, load_run_state, nightly_flow
from storage import Registry

SMALL = {"model": {"device": "cpu"}, "propose": {"num_prompts": 48}, "rollout": {"prompts_per_shard": 24},
         "posttrain": {"steps": 12, "micro_batch": 16, "checkpoint_every": 6},
         "benchmark": {"prompts_per_category": 6, "samples": 2, "bootstrap": 200}}


def small_cfg(store, name, **over):
    data = {**SMALL, "run": {"name": name, "store": str(store)}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return CycleConfig.model_validate(data)


def test_cycle_summary_registry_report_and_cache(tmp_path, prefect_api):
    cfg = small_cfg(tmp_path, "cyc")
    first = cycle_flow(cfg)
    for side in ("parent", "child"):
        for k in ("gen_acc_oracle", "und_acc_gt", "non_unification", "unicycle_soft", "unicycle_hard"):
            assert 0.0 <= first[side][k] <= 1.0
    reg = Registry(str(tmp_path))
    child = reg.require(first["child"]["checkpoint_id"])
    assert child.parent == first["parent"]["checkpoint_id"]
    promoted = reg.promoted().checkpoint_id
    assert promoted == (first["child"]["checkpoint_id"] if first["promoted"] else first["parent"]["checkpoint_id"])
    gen_delta = first["child"]["gen_acc_oracle"] - first["parent"]["gen_acc_oracle"]
    assert first["promoted"] == (gen_delta > 0 and first["child"]["und_acc_gt"] >= first["parent"]["und_acc_gt"] - 0.01)
    report = Path(first["report"])
    text = report.read_text()
    assert "| gen_acc_oracle |" in text and ("not promoted" in text) != first["promoted"]
    # the child's judge on the parent's images: only the judge differs, and the report says by how much
    j = first["delta_judge_on_parent_images"]
    change = first["child"]["judge_agreement_on_parent_images"] - first["parent"]["judge_oracle_agreement"]
    assert j["delta"] == pytest.approx(change, abs=2e-4) and j["ci_low"] - 1e-9 <= j["delta"] <= j["ci_high"] + 1e-9
    assert "| judge_agreement_on_parent_images |" in text and "The judge alone" in text
    for png in ("per_category.png", "history.png", "best_worst.png"):
        assert (report.parent / png).stat().st_size > 1000
    again = cycle_flow(cfg)  # everything cached: same checkpoint, same numbers
    assert again["child"] == first["child"] and again["parent"] == first["parent"]


def test_nightly_chains_cycles_from_the_promoted_checkpoint(tmp_path, prefect_api):
    cfg = small_cfg(tmp_path, "night", gate={"min_gain": -1.0, "max_understanding_drop": 1.0})  # always promote
    results = nightly_flow(cfg, cycles=2)
    assert [r["cycle"] for r in results] == [0, 1] and all(r["promoted"] for r in results)
    assert results[1]["parent"]["checkpoint_id"] == results[0]["child"]["checkpoint_id"]
    lineage = Registry(str(tmp_path)).lineage(results[1]["child"]["checkpoint_id"])
    assert [m.checkpoint_id for m in lineage][:3] == [results[1]["child"]["checkpoint_id"],
                                                      results[0]["child"]["checkpoint_id"],
                                                      results[0]["parent"]["checkpoint_id"]]
    state = load_run_state(str(tmp_path), "night")
    assert {"cycle0", "cycle1"} <= set(state)
