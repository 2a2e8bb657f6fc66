"""Backends behind the registry: a backend registered from the test suite runs a whole cycle with no edit to
tasks/ or flows/, and the benchmark suite is never proposed, whatever the backend."""

import json
from pathlib import Path

import pytest

from configs.loader import ConfigError, load_config
from configs.schema import CycleConfig
from flows.runner import Contexts
from model.embedded.umm import EmbeddedUMM
from storage import Dataset, Registry, RunRecords
from tasks import propose, suite
from tasks.stage import read, run_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/cycle/tiny.yaml"
SMALL = {"propose": {"num_prompts": 48}, "rollout": {"prompts_per_shard": 24, "cfg_min": 1.0, "cfg_max": 1.5},
         "posttrain": {"steps": 12, "micro_batch": 16, "checkpoint_every": 6},
         "benchmark": {"prompts_per_category": 6, "samples": 2, "bootstrap": 200, "cfg_scale": 1.0,
                       "sampling": {"temperature": 1.8}}}


@pytest.fixture
def toy(monkeypatch):
    # the post-training workers inherit the variable and register the toy backend too
    monkeypatch.setenv("SELFPLAY_BACKENDS", "tests.toy_backend")


def test_a_backend_registered_from_the_tests_runs_a_cycle(tmp_path, prefect_api, toy):
    from flows.cycle import cycle_flow

    cfg = CycleConfig.model_validate({**SMALL, "run": {"name": "toy", "store": str(tmp_path)},
                                      "model": {"backend": "toy", "device": "cpu", "temperature_scale": 0.9}})
    summary = cycle_flow(cfg)
    rec = RunRecords(str(tmp_path), "toy").load(0)
    parent, child = summary["parent"]["checkpoint_id"], summary["child"]["checkpoint_id"]
    assert rec.config["model"]["backend"] == "toy" and rec.config["model"]["temperature_scale"] == 0.9
    assert rec.checkpoint_id == parent != EmbeddedUMM.from_pretrained().model_id  # the toy's own base
    drawn = read(rec.outputs("rollout")["rollouts"], ["checkpoint_id", "temperature"]).to_pylist()
    assert {r["checkpoint_id"] for r in drawn} == {parent}
    meta = Registry(str(tmp_path)).require(child)
    assert meta.parent == parent and child != parent
    # the trainer (a torchrun subprocess) loaded and saved the toy backend through the registry
    saved = json.loads(Path(Registry(str(tmp_path)).local_dir(child), "config.json").read_text())
    assert saved["model_type"] == "toy-umm"
    assert summary["reason"].startswith(("promoted", "not promoted"))
    assert 0.0 <= summary["child"]["gen_acc_oracle"] <= 1.0


def test_a_registered_backend_types_its_own_config_section(toy):
    cfg = load_config(TINY, CycleConfig, ["model.backend=toy", "model.temperature_scale=2"])
    assert type(cfg.model).__name__ == "ToySection" and cfg.model.temperature_scale == 2.0
    with pytest.raises(ConfigError, match=r"model.temperature_scale: .*less than or equal to 4"):
        load_config(TINY, CycleConfig, ["model.backend=toy", "model.temperature_scale=9"])
    with pytest.raises(ConfigError, match=r"model.temperature_scale: unknown key"):
        load_config(TINY, CycleConfig, ["model.temperature_scale=2"])  # the embedded section has no such knob


@pytest.mark.parametrize("backend", ["embedded", "toy"])
def test_the_benchmark_suite_is_never_proposed(tmp_path, toy, backend):
    cfg = CycleConfig.model_validate({"run": {"name": "p", "store": str(tmp_path)},
                                      "model": {"backend": backend, "device": "cpu"},
                                      "propose": {"num_prompts": 400}, "benchmark": {"prompts_per_category": 100}})
    ctx = Contexts(cfg, replay=False).for_checkpoint("base")
    ctx.log = lambda _: None
    held = run_in_process(suite, {}, cfg.benchmark, ctx)
    ref = run_in_process(propose, held, cfg.propose, ctx)["prompts"]
    model = ctx.model
    canon = {model.canonical_prompt(p)[0] for p in read(held["suite"], ["prompt"]).column("prompt").to_pylist()}
    rows = Dataset(ref).read().to_pylist()
    valid = [r for r in rows if r["valid"]]
    assert len(valid) == 400
    assert not {model.canonical_prompt(r["prompt"])[0] for r in valid} & canon
    refused = [r for r in rows if r["invalid_reason"] == "held out for the benchmark suite"]
    assert refused, "the model never proposed a suite prompt: the exclusion was not exercised"
