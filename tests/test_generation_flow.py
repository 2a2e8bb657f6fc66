"""The generation side as a real Prefect flow on the embedded model: datasets, reuse, partial recompute, kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.schema import CycleConfig
from flows.cycle import generate_flow
from storage import Dataset, RunRecords

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(store, name="gen", **sections):
    base = {"run": {"name": name, "store": str(store), "seed": 0}, "model": {"device": "cpu"},
            "propose": {"num_prompts": 64}, "rollout": {"samples_per_prompt": 8, "prompts_per_shard": 16}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return CycleConfig.model_validate(base)


def refs_of(store, run, cycle=None):
    """Every dataset the run's recorded cycle wrote, by name."""
    rec = RunRecords(str(store), run).load(cycle)
    return {k: v for node in rec.nodes.values() for k, v in node.outputs.items()}


def created(ref):
    return Dataset(ref).manifest().created_at + str(Path(Dataset(ref).manifest_path).stat().st_mtime_ns)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_api):
    store = tmp_path_factory.mktemp("store")
    cfg = cfg_for(store)
    summary = generate_flow(cfg)
    return store, cfg, summary


def test_flow_writes_four_datasets_with_documented_schemas(first_run):
    store, cfg, summary = first_run
    refs = refs_of(store, "gen")
    cols = {"prompts": {"prompt_id", "cycle", "category", "prompt", "seed_prompt_ids", "source", "valid",
                        "invalid_reason"},
            "rollouts": {"prompt_id", "sample_idx", "seed", "cfg_scale", "temperature", "top_k", "image",
                         "checkpoint_id", "gen_ms"},
            "judgements": {"prompt_id", "sample_idx", "judge_id", "rubric", "reasoning", "score", "parse_ok", "raw"},
            "selections": {"prompt_id", "best_sample_idx", "max_score", "min_score", "accepted", "reason"},
            "discard_pool": {"prompt_id", "prompt", "category", "max_score", "cycles_tried"}}
    for name, want in cols.items():
        table = Dataset(refs[name]).read()
        assert want <= set(table.column_names), name
    prompts = Dataset(refs["prompts"]).read().to_pylist()
    valid = [p for p in prompts if p["valid"]]
    assert len(valid) == 64 and len({p["prompt_id"] for p in valid}) == 64
    assert all(p["invalid_reason"] for p in prompts if not p["valid"])
    rollouts = Dataset(refs["rollouts"]).read(["prompt_id", "sample_idx", "cfg_scale"]).to_pylist()
    assert len(rollouts) == 64 * 8
    assert sorted({r["cfg_scale"] for r in rollouts}) == pytest.approx([3 + 5 * i / 7 for i in range(8)], abs=1e-3)
    judged = Dataset(refs["judgements"]).read().to_pylist()
    assert len(judged) == 64 * 8 and {j["judge_id"] for j in judged} == {"self"}
    assert all(0 <= j["score"] <= 10 for j in judged if j["parse_ok"])
    sel = Dataset(refs["selections"]).read().to_pylist()
    assert len(sel) == 64
    for s in sel:
        assert s["accepted"] == (s["max_score"] is not None and s["max_score"] >= 7)
    pool = {r["prompt_id"] for r in Dataset(refs["discard_pool"]).read().to_pylist()}
    assert pool == {s["prompt_id"] for s in sel if not s["accepted"]}


def test_second_run_reuses_every_stage(first_run):
    store, cfg, _ = first_run
    before = {k: created(r) for k, r in refs_of(store, "gen").items()}
    generate_flow(cfg)
    after = refs_of(store, "gen")
    assert {k: created(r) for k, r in after.items()} == before


def test_threshold_recomputes_only_select_and_rubric_only_judge_and_select(first_run):
    store, cfg, _ = first_run
    before = refs_of(store, "gen")
    generate_flow(cfg.model_copy(update={"select": cfg.select.model_copy(update={"threshold": 9.0})}))
    after = refs_of(store, "gen")
    same = {k for k in before if before[k].fingerprint == after[k].fingerprint}
    assert same == {"suite", "heldout", "prompts", "rollouts", "judgements"}
    assert {created(after[k]) for k in same} == {created(before[k]) for k in same}
    rubric = {"partial_max": 5}
    generate_flow(cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"rubric": rubric})}))
    third = refs_of(store, "gen")
    kept = {k for k in before if before[k].fingerprint == third[k].fingerprint}
    assert kept == {"suite", "heldout", "prompts", "rollouts"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_or_stopped_mid_rollout_then_rerun_has_exact_rows(tmp_path, prefect_api, sig):
    """SIGKILL loses only the shards in flight; SIGTERM (or Ctrl-C) also says so in one line and exits 130."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(cfg_for(tmp_path, name="killed",
                                           rollout={"prompts_per_shard": 2}).model_dump(mode="json")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=prefect_api)
    cmd = [sys.executable, "-m", "flows.cli", "generate", str(cfg_path)]
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        parts = list(run_dir.glob("rollouts-*/part-*.json"))
        if len(parts) >= 3 and not list(run_dir.glob("rollouts-*/_manifest.json")):
            said = err.stat().st_size
            proc.send_signal(sig)
            killed_at = len(parts)
            break
        time.sleep(0.01)
    rc = proc.wait()
    assert killed_at is not None, "the flow finished before it could be killed mid-rollout"
    assert not list(run_dir.glob("rollouts-*/_manifest.json"))
    if sig == signal.SIGTERM:
        after = err.read_bytes()[said:].decode(errors="replace")
        lines = [ln for ln in after.replace("\r", "\n").splitlines() if "interrupted" in ln or "Error" in ln
                 or "Traceback" in ln or "Crash" in ln]
        assert rc == 130 and len(lines) == 1 and lines[0].startswith("interrupted: stopped"), after[-3000:]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    ref = refs_of(tmp_path, "killed")["rollouts"]
    rows = Dataset(ref).read(["prompt_id", "sample_idx"]).to_pylist()
    assert len(rows) == 64 * 8
    assert len({(r["prompt_id"], r["sample_idx"]) for r in rows}) == 64 * 8


def test_single_stage_rerun_from_the_run_record(first_run):
    from flows.cycle import stage_flow
    from flows.dags import DagError

    store, cfg, _ = first_run
    before = refs_of(store, "gen")
    over = ["judge.rubric.partial_max=4"]
    out = stage_flow("judge", "gen", overrides=over, store=str(store))
    assert list(out["nodes"]) == ["judge", "select"]  # the stage and what depends on it
    judged = out["nodes"]["judge"]["outputs"]["judgements"]
    assert judged != before["judgements"].path and out["nodes"]["select"]["outputs"]["selections"] != \
        before["selections"].path
    assert refs_of(store, "gen") == before, "the cycle's own record stays as it ran"
    assert created(before["rollouts"]) == created(refs_of(store, "gen")["rollouts"])
    stamp = Path(judged, "_manifest.json").stat().st_mtime_ns
    again = stage_flow("judge", "gen", overrides=over, store=str(store), only=True)  # cached
    assert list(again["nodes"]) == ["judge"] and again["nodes"]["judge"]["outputs"]["judgements"] == judged
    assert Path(judged, "_manifest.json").stat().st_mtime_ns == stamp
    stage_flow("judge", "gen", overrides=over, store=str(store), only=True, refresh=True)  # forced
    assert Path(judged, "_manifest.json").stat().st_mtime_ns != stamp
    with pytest.raises(DagError, match="'paint' is not in run"):
        stage_flow("paint", "gen", store=str(store))


def test_the_same_config_in_two_stores_then_one_deleted(first_run, tmp_path):
    """A run's refs never leave its store: the commit cache of one store never answers for another's."""
    import shutil

    store, cfg, _ = first_run
    generate_flow(cfg)  # cached: this config's record again (earlier tests ran variants of it)
    before = refs_of(store, "gen")
    other = tmp_path / "other"
    generate_flow(cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": str(other)})}))
    assert all(r.store == str(other) for r in refs_of(other, "gen").values())
    shutil.rmtree(other)
    generate_flow(cfg)
    after = refs_of(store, "gen")
    assert after == before and all(r.store == str(store) for r in after.values())
    assert {k: created(r) for k, r in after.items()} == {k: created(r) for k, r in before.items()}
    assert all(Dataset(r).intact() for r in after.values())
