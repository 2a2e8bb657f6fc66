"""`selfplay ablate cpr` end to end on the embedded model (small sizes): one generation side, five children
(generation-only SFT, a CPR mixture set with --cpr-mixture, DPO, GRPO, and the ground-truth ceiling) trained on it,
each benchmarked beside the parent and its judge measured on the parent's images."""

import json

from typer.testing import CliRunner

from flows.cli import app
from flows.dags import DAGS
from model.world import verify
from storage import Dataset, Registry, RunRecords, from_png


def test_ablate_cpr_prints_the_arms_as_json(tmp_path, prefect_api):
    over = [f"run.store={tmp_path}", "run.name=abl", "propose.num_prompts=48", "rollout.prompts_per_shard=24",
            "select.threshold=6", "reconstruct.generation_min_score=6", "reconstruct.heldout_share=0.2",
            "posttrain.steps=8", "posttrain.micro_batch=16", "posttrain.checkpoint_every=4",
            "benchmark.prompts_per_category=4", "benchmark.samples=2", "benchmark.bootstrap=200"]
    arms = [a for name in ("gen_only", "cpr", "dpo", "grpo", "ceiling") for a in ("--arm", name)]
    res = CliRunner().invoke(app, ["ablate", "cpr", "configs/cycle/tiny.yaml", *over, "--cpr-mixture", "reflection=0",
                                   *arms])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])  # logs and bars go to stderr
    assert list(out) == ["base", "gen_only", "cpr", "dpo", "grpo", "ceiling"]
    for arm, m in out.items():
        for k in ("gen_acc_oracle", "und_acc_gt", "non_unification", "judge_oracle_agreement"):
            assert 0.0 <= m[k] <= 1.0, (arm, k)
    ids = {m["checkpoint_id"] for m in out.values()}
    assert len(ids) == 6, "five distinct children beside the parent"
    reg = Registry(str(tmp_path))
    for arm in ("gen_only", "cpr", "dpo", "grpo"):
        assert reg.require(out[arm]["checkpoint_id"]).parent == out["base"]["checkpoint_id"]
    # the CPR arm trains UniCorn's kinds (here without reflection) whatever the recipe's own mixture
    assert out["cpr"]["train_examples"] > 2 * out["gen_only"]["train_examples"]
    assert out["cpr"]["mixture"] == {"generation": 5, "caption": 5, "judgement": 3, "reflection": 0}
    # GRPO trains on every scored rollout of each prompt whose scores differ: at least two a DPO pair's prompt
    assert out["grpo"]["train_examples"] >= 2 * out["dpo"]["train_examples"] > 0
    for arm in ("gen_only", "cpr", "dpo", "grpo"):  # the paired interval of the change brackets the change
        lo, hi = out[arm]["gen_acc_oracle_delta_ci95"]
        assert lo - 1e-3 <= out[arm]["gen_acc_oracle"] - out["base"]["gen_acc_oracle"] <= hi + 1e-3
        # the arm's judge on the base's own images: the interval brackets that change too
        lo, hi = out[arm]["judge_agreement_on_parent_images_delta_ci95"]
        change = out[arm]["judge_agreement_on_parent_images"] - out["base"]["judge_oracle_agreement"]
        assert lo - 1e-3 <= change <= hi + 1e-3
    # the ceiling: the same accepted prompts as generation-only SFT, each with a true render the oracle passes
    assert [out[a]["self_play"] for a in ("gen_only", "grpo", "ceiling")] == [True, True, False]
    record = RunRecords(str(tmp_path), "abl").load(0)
    truth = Dataset(record.outputs("ground_truth_ceiling")["cpr"]).read().to_pylist()
    mine = Dataset(record.outputs("reconstruct_gen_only")["cpr"]).read().to_pylist()
    assert {r["prompt_id"] for r in truth} == {r["prompt_id"] for r in mine}
    assert all(json.loads(r["meta"])["source"] == "world_render" and verify(r["input_text"], from_png(r["target_image"])).ok
               for r in truth)
    drawn = {r["prompt_id"]: r["target_image"] for r in mine}  # a simple scene the model may draw exactly
    assert sum(r["target_image"] != drawn[r["prompt_id"]] for r in truth) > len(truth) / 2


def test_no_self_play_dag_trains_on_true_renders():
    assert all(n.stage != "ground_truth" for dag in DAGS.values() for n in dag.nodes)


def test_ablate_cpr_mixture_option_names_a_bad_kind(tmp_path):
    res = CliRunner().invoke(app, ["ablate", "cpr", "configs/cycle/tiny.yaml", f"run.store={tmp_path}",
                                   "--cpr-mixture", "reflexion=0"])
    assert res.exit_code == 2 and "--cpr-mixture" in res.output and "reflexion" in res.output
    assert not any(tmp_path.iterdir()), "nothing written for a refused command"
    res = CliRunner().invoke(app, ["ablate", "cpr", "configs/cycle/tiny.yaml", f"run.store={tmp_path}",
                                   "--arm", "grpo", "--arm", "ceilling"])
    assert res.exit_code == 2 and "--arm" in res.output and "ceilling" in res.output
    assert not any(tmp_path.iterdir()), "nothing written for a refused command"
