"""The learning side on the embedded model: CPR reconstruction from self-generated data, DeepSpeed SFT/DPO,
held-out loss per kind, and resume after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs.schema import CycleConfig, PosttrainConfig
from flows.runner import Contexts
from storage import Dataset, Registry
from tasks import judge, posttrain, propose, reconstruct, rollout, select
from tasks.posttrain import child_of
from tasks.stage import run_in_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    store = tmp_path_factory.mktemp("learn")
    cfg = CycleConfig.model_validate({"run": {"name": "learn", "store": str(store)}, "model": {"device": "cpu"},
                                      "propose": {"num_prompts": 96}, "rollout": {"prompts_per_shard": 48},
                                      "reconstruct": {"heldout_share": 0.25}})
    ctx = Contexts(cfg, replay=False).for_checkpoint(cfg.model.checkpoint)
    ctx.log = lambda _: None
    refs = run_in_process(propose, {}, cfg.propose, ctx)
    refs.update(run_in_process(rollout, {"prompts": refs["prompts"]}, cfg.rollout, ctx))
    refs.update(run_in_process(judge, {k: refs[k] for k in ("prompts", "rollouts")}, cfg.judge, ctx))
    refs.update(select.run({k: refs[k] for k in ("prompts", "judgements")}, cfg.select, ctx))
    refs.update(reconstruct.run({k: refs[k] for k in ("prompts", "rollouts", "judgements", "selections")},
                                cfg.reconstruct, ctx))
    return store, cfg, ctx, refs


def test_cpr_kinds_mixture_and_lineage(generated):
    _, cfg, _, refs = generated
    rows = Dataset(refs["cpr"]).read().to_pylist()
    sel = {r["prompt_id"]: r for r in Dataset(refs["selections"]).read().to_pylist()}
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("generation", "caption", "judgement", "reflection")}
    n_gen = len(kinds["generation"])
    assert n_gen == sum(s["accepted"] for s in sel.values()) > 0
    assert len(kinds["caption"]) == n_gen  # 5 : 5
    assert len(kinds["judgement"]) == round(n_gen * 3 / 5)
    for g in kinds["generation"]:  # lineage: the best sample of an accepted prompt
        assert sel[g["prompt_id"]]["accepted"] and g["sample_ids"] == [sel[g["prompt_id"]]["best_sample_idx"]]
    for r in kinds["reflection"]:
        s = sel[r["prompt_id"]]
        assert s["max_score"] > 8 and s["max_score"] - s["min_score"] >= 3
        assert r["sample_ids"] == [s["worst_sample_idx"], s["best_sample_idx"]]
    scores = {json.loads(r["meta"])["score"] for r in kinds["judgement"]}
    assert min(scores) < 7 <= max(scores), "judgement examples must span the score range, not only winners"
    assert len({c["input_text"] for c in kinds["caption"]}) >= 2  # several instruction templates
    assert {r["split"] for r in rows} == {"train", "heldout"}


def train(refs, cfg, ctx) -> dict:
    """posttrain on the CPR data; the child's checkpoint row (id, dir, metrics)."""
    return child_of(posttrain.run({k: refs[k] for k in ("cpr", "dpo_pairs", "groups")}, cfg, ctx)["checkpoint"])


def _posttrain_cfg(**kw):
    return PosttrainConfig.model_validate({"steps": 40, "micro_batch": 16, "lr": 5e-5, "warmup_steps": 5,
                                          "checkpoint_every": 10, **kw})


def test_sft_lowers_heldout_loss_and_registers_lineage(generated):
    store, cfg, ctx, refs = generated
    out = train(refs, _posttrain_cfg(), ctx)
    m = out["metrics"]
    assert set(m["heldout_before"]) == {"generation", "caption", "judgement", "reflection"}
    for kind in ("generation", "caption", "reflection"):
        assert m["heldout_after"][kind] < m["heldout_before"][kind], kind
    # the base model's judgement text is near its floor (about 0.01 nats a token): it must hold, not fall
    assert m["heldout_after"]["judgement"] < m["heldout_before"]["judgement"] + 0.005, m
    meta = Registry(str(store)).require(out["checkpoint_id"])
    assert meta.parent == ctx.model_id and meta.data_fingerprint == refs["cpr"].fingerprint
    assert meta.config["steps"] == 40


def test_dpo_objective_trains_and_differs_from_sft(generated):
    store, cfg, ctx, refs = generated
    out = train(refs, _posttrain_cfg(objective="dpo", steps=10), ctx)
    assert out["metrics"]["objective"] == "dpo" and out["metrics"]["steps"] == 10
    assert out["checkpoint_id"] != ctx.model_id


def test_grpo_trains_on_every_scored_rollout_of_the_groups(generated):
    store, cfg, ctx, refs = generated
    groups = Dataset(refs["groups"]).read(["kind", "split", "prompt_id", "meta"]).to_pylist()
    assert groups and {g["kind"] for g in groups} == {"group"}
    by_prompt = {}
    for g in groups:
        by_prompt.setdefault(g["prompt_id"], []).append(json.loads(g["meta"])["advantage"])
    for adv in by_prompt.values():  # standardised within each prompt's group
        assert len(adv) >= 2 and abs(sum(adv) / len(adv)) < 1e-9
        assert abs(sum(a * a for a in adv) / len(adv) - 1) < 1e-9
    # each sample's ratio is taken under the temperature that drew it (the rollout's, recorded per row)
    drawn = {(r["prompt_id"], r["sample_idx"]): (r["temperature"], r["cfg_scale"]) for r in
             Dataset(refs["rollouts"]).read(["prompt_id", "sample_idx", "temperature", "cfg_scale"]).to_pylist()}
    for g in Dataset(refs["groups"]).read(["prompt_id", "sample_ids", "meta"]).to_pylist():
        meta = json.loads(g["meta"])
        assert (meta["temperature"], meta["cfg_scale"]) == drawn[(g["prompt_id"], g["sample_ids"][0])]
    out = train(refs, _posttrain_cfg(objective="grpo", steps=6, checkpoint_every=3), ctx)
    assert out["metrics"]["objective"] == "grpo" and out["checkpoint_id"] != ctx.model_id
    assert out["metrics"]["train_examples"] == sum(g["split"] == "train" for g in groups)
    both = train(refs, _posttrain_cfg(objective="grpo", steps=6, checkpoint_every=3, grpo_sft_weight=1.0), ctx)
    cpr_train = sum(r == "train" for r in Dataset(refs["cpr"]).read(["split"]).column("split").to_pylist())
    assert both["metrics"]["train_examples"] == out["metrics"]["train_examples"] + cpr_train
    assert both["checkpoint_id"] not in (out["checkpoint_id"], ctx.model_id)


def test_killed_posttrain_resumes_from_last_checkpoint(generated, tmp_path):
    store, cfg, ctx, refs = generated
    pcfg = _posttrain_cfg(steps=60, seed=1)
    script = (
        "import json,sys; from storage import DatasetRef; from configs.schema import PosttrainConfig;"
        "from tasks.stage import StageContext; from tasks import posttrain;"
        "a=json.loads(sys.argv[1]); ctx=StageContext(store=a['store'], run='learn', model_id=a['model_id'],"
        " model_dir=a['model_dir']);"
        "out=posttrain.run({k: DatasetRef.model_validate(v) for k, v in a['refs'].items()},"
        " PosttrainConfig.model_validate(a['cfg']), ctx); print(json.dumps(posttrain.child_of(out['checkpoint'])"
        "['metrics'])); sys.stdout.flush();"
        # this driver process aborted at interpreter shutdown in 2 of 5 runs here ('terminate called without an
        # active exception'), after the work and its output were complete: reported, not what this test measures
        "import os; os._exit(0)")
    arg = json.dumps({"store": str(store), "model_id": ctx.model_id, "model_dir": ctx.model_dir,
                      "cfg": pcfg.model_dump(mode="json"), "refs": {k: refs[k].model_dump() for k in ("cpr", "dpo_pairs")}})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_dir = posttrain.work_dir(posttrain.plan_of({k: refs[k] for k in ("cpr", "dpo_pairs")}, pcfg, ctx), ctx)
    proc = subprocess.Popen([sys.executable, "-c", script, arg], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(out_dir.glob("ckpt/step-*/state.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert not (out_dir / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run([sys.executable, "-c", script, arg], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["resumed_from"] > 0 and metrics["steps"] == 60
    logged = [json.loads(x)["step"] for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1] == 60 and set(range(1, 61)) <= set(logged)


def test_ema_export_averages_weights_and_keeps_integer_buffers(generated):
    from safetensors.torch import load_file

    from model.embedded.umm import BASE_DIR

    store, cfg, ctx, refs = generated
    out = train(refs, _posttrain_cfg(steps=20, ema_decay=0.9, export="ema"), ctx)
    child = load_file(str(Path(out["dir"]) / "model.safetensors"))
    parent = load_file(str(BASE_DIR / "model.safetensors"))
    ints = [k for k, v in parent.items() if not v.is_floating_point()]
    assert ints, "the embedded model has integer index buffers"
    for k in ints:  # averaged in float and cast back they came out truncated, and the export was wrecked
        assert torch.equal(child[k], parent[k]), k
    m = out["metrics"]
    assert m["heldout_after"]["generation"] < m["heldout_before"]["generation"]


def test_freeze_keeps_matching_parameters_fixed_and_names_a_bad_pattern(generated):
    from safetensors.torch import load_file

    from model.embedded.umm import BASE_DIR

    store, cfg, ctx, refs = generated
    out = train(refs, _posttrain_cfg(steps=6, freeze=["blocks.0.*", "fac_*"]), ctx)
    child = load_file(str(Path(out["dir"]) / "model.safetensors"))
    parent = load_file(str(BASE_DIR / "model.safetensors"))
    frozen = [k for k in parent if k.startswith(("blocks.0.", "fac_"))]
    assert frozen and all(torch.equal(child[k], parent[k]) for k in frozen)
    assert not torch.equal(child["blocks.1.fc1.weight"], parent["blocks.1.fc1.weight"])  # the rest trained
    with pytest.raises(RuntimeError, match=r"posttrain.freeze: 'block.*' matches no parameter"):
        train(refs, _posttrain_cfg(steps=6, freeze=["block.*"]), ctx)


def test_the_oracle_never_weights_training_data(generated):
    """GRPO's advantages come from reconstruct, not select: the oracle's scores are refused there too, before any
    example is written."""
    store, cfg, ctx, refs = generated
    oracle = run_in_process(judge, {k: refs[k] for k in ("prompts", "rollouts")},
                            cfg.judge.model_copy(update={"judge": "oracle"}), ctx)["judgements"]
    inputs = {**{k: refs[k] for k in ("prompts", "rollouts", "selections")}, "judgements": oracle}
    before = sorted(p.name for p in Path(store, "learn").iterdir())
    with pytest.raises(ValueError, match="the oracle only measures"):
        reconstruct.run(inputs, cfg.reconstruct, ctx)
    assert sorted(p.name for p in Path(store, "learn").iterdir()) == before, "nothing half-written"


def test_two_ranks_keep_a_share_of_the_ema_each_resume_it_and_export_it_whole(generated):
    """posttrain.nproc 2 (two gloo ranks on the CPU): each rank averages and checkpoints only its share of the
    trained tensors; the export gathers every share, and a run resumed from those shares ends where the
    uninterrupted one did."""
    from safetensors.torch import load_file

    store, cfg, ctx, refs = generated
    kw = dict(steps=8, micro_batch=8, checkpoint_every=4, seed=3, nproc=2, ema_decay=0.9)
    inputs = {k: refs[k] for k in ("cpr", "dpo_pairs", "groups")}  # as `train` passes them
    dirs = {}
    for export in ("ema", "raw"):
        out = train(refs, _posttrain_cfg(export=export, **kw), ctx)
        assert out["metrics"]["world_size"] == 2
        dirs[export] = posttrain.work_dir(posttrain.plan_of(inputs, _posttrain_cfg(export=export, **kw), ctx), ctx)
    step4 = {e: d / "ckpt" / "step-000004" for e, d in dirs.items()}
    shares = [load_file(str(step4["ema"] / f"ema-rank{r}.safetensors")) for r in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    raw4 = load_file(str(step4["ema"] / "model.safetensors"))
    trained = set(shares[0]) | set(shares[1])
    assert trained == {k for k, v in raw4.items() if v.is_floating_point()}  # the embedded model trains them all
    # both runs trained alike (only their export differs), so each exported tensor must be an average, not the
    # raw weights a missing share would leave in its place
    assert all(torch.equal(raw4[k], v) for k, v in load_file(str(step4["raw"] / "model.safetensors")).items())
    ema_final = load_file(str(dirs["ema"] / "final" / "model.safetensors"))
    raw_final = load_file(str(dirs["raw"] / "final" / "model.safetensors"))
    changed = [k for k in trained if not torch.equal(raw_final[k], raw4[k])]
    assert len(changed) == len(trained)
    assert all(not torch.equal(ema_final[k], raw_final[k]) for k in trained)
    # resumed from step 4's shares, the same run ends with the same EMA
    shutil.rmtree(dirs["ema"] / "final")
    posttrain.launch(json.loads((dirs["ema"] / "job.json").read_text()), dirs["ema"], 2, 600, lambda _: None)
    again = load_file(str(dirs["ema"] / "final" / "model.safetensors"))
    assert "resumed from step-000004" in (dirs["ema"] / "worker.log").read_text()
    assert all(torch.equal(again[k], v) for k, v in ema_final.items())
    # a checkpoint written before the shares holds the whole EMA in one file: it resumes the same way
    from safetensors.torch import save_file

    save_file({**shares[0], **shares[1]}, str(step4["ema"] / "ema.safetensors"))
    for r in (0, 1):
        (step4["ema"] / f"ema-rank{r}.safetensors").unlink()
    shutil.rmtree(dirs["ema"] / "final")
    posttrain.launch(json.loads((dirs["ema"] / "job.json").read_text()), dirs["ema"], 2, 600, lambda _: None)
    old = load_file(str(dirs["ema"] / "final" / "model.safetensors"))
    assert all(torch.equal(old[k], v) for k, v in ema_final.items())
