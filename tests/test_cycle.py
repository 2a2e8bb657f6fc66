"""One full cycle as a real Prefect flow run on the embedded model: JSON summary, registry lineage, gate, report,
cache on a second run; the nightly flow chaining cycles through the promoted pointer and discard pool; and
one-stage reruns of each recorded cycle replaying exactly what it ran."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from configs.schema import CycleConfig
from flows.cli import app
from flows.cycle import cycle_flow, nightly_flow, stage_flow
from storage import Dataset, Registry, RunRecords

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


def test_nightly_chains_cycles_and_each_recorded_stage_reruns_as_it_ran(tmp_path, prefect_api):
    # always promote; a strict select so that some prompts fail and return (curriculum)
    cfg = small_cfg(tmp_path, "night", gate={"min_gain": -1.0, "max_understanding_drop": 1.0}, select={"threshold": 10})
    results = nightly_flow(cfg, cycles=2)
    stamps = {ref.path: Dataset(ref).manifest().created_at for c in (0, 1)
              for node in RunRecords(str(tmp_path), "night").load(c).nodes.values() for ref in node.outputs.values()}
    assert [r["cycle"] for r in results] == [0, 1] and all(r["promoted"] for r in results)
    assert results[1]["parent"]["checkpoint_id"] == results[0]["child"]["checkpoint_id"]
    lineage = Registry(str(tmp_path)).lineage(results[1]["child"]["checkpoint_id"])
    assert [m.checkpoint_id for m in lineage][:3] == [results[1]["child"]["checkpoint_id"],
                                                      results[0]["child"]["checkpoint_id"],
                                                      results[0]["parent"]["checkpoint_id"]]
    records = RunRecords(str(tmp_path), "night")
    assert records.cycles() == [0, 1]
    rec0, rec1 = records.load(0), records.load(1)
    # cycle 1 ran from the promoted checkpoint, recorded by id, and from cycle 0's discard pool and seed library
    assert rec1.checkpoint_id == results[0]["child"]["checkpoint_id"] == rec1.config["model"]["checkpoint"]
    assert rec1.carried == {k: rec0.outputs("select")[k] for k in ("discard_pool", "seed_library")}
    assert rec1.nodes["propose"].inputs["discard_pool"] == rec0.outputs("select")["discard_pool"]
    # the curriculum: cycle 1 offered cycle 0's discard pool again, up to its share, and counted what it offered
    pool = Dataset(rec0.outputs("select")["discard_pool"]).read().num_rows
    share = int(cfg.propose.discard_pool_share * cfg.propose.num_prompts)
    assert [r["generation"]["propose"]["from_discard_pool"] for r in results] == [0, min(pool, share)]
    assert all(r["seconds"] > 0 for r in results)

    # each cycle's propose, select and judge rerun alone: a cache hit on the recorded data and checkpoint
    for rec in (rec0, rec1):
        for stage in ("propose", "select", "judge"):
            out = stage_flow(stage, "night", rec.cycle, store=str(tmp_path), only=True)
            node = out["nodes"][stage]
            assert node["outputs"] == node["recorded"], (rec.cycle, stage)
            assert node["checkpoint_id"] == rec.nodes[stage].checkpoint_id, (rec.cycle, stage)
            for ref in rec.nodes[stage].outputs.values():
                assert Dataset(ref).manifest().created_at == stamps[ref.path], (rec.cycle, stage)


    # a new rubric for cycle 1's judge: the judge and what depends on it recompute, with the checkpoint that drew
    # cycle 1's rollouts (its parent), not the promoted one (cycle 1's child); the pointer does not move
    promoted = Registry(str(tmp_path)).promoted().checkpoint_id
    assert promoted == results[1]["child"]["checkpoint_id"] != rec1.checkpoint_id
    res = CliRunner().invoke(app, ["stage", "judge", "--run", "night", "--cycle", "1", "--store", str(tmp_path),
                                   "judge.rubric.partial_max=4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["nodes"]["judge"]["checkpoint_id"] == rec1.checkpoint_id
    assert out["nodes"]["judge"]["outputs"] != out["nodes"]["judge"]["recorded"]
    assert set(out["nodes"]) == {"judge", "select", "reconstruct", "posttrain", "benchmark_child", "judge_shift",
                                 "gate", "report"}
    assert out["nodes"]["select"]["outputs"]["selections"] != out["nodes"]["select"]["recorded"]["selections"]
    for ref in (*rec1.outputs("propose").values(), *rec1.outputs("rollout").values()):  # not rerun
        assert Dataset(ref).manifest().created_at == stamps[ref.path]
    assert Registry(str(tmp_path)).promoted().checkpoint_id == promoted
    assert RunRecords(str(tmp_path), "night").load(1) == rec1, "the cycle's own record stays as it ran"
    assert Path(out["record"]).is_file()
