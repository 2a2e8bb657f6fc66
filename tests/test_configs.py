"""Typed configs: YAML + key=value overrides; every mistake is one message naming file, key path and expectation."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs.loader import ConfigError, load_config
from configs.schema import CycleConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "cycle" / "tiny.yaml"


def test_every_shipped_cycle_config_validates():
    configs = sorted((ROOT / "configs" / "cycle").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path, CycleConfig)


def test_overrides_apply_with_types():
    cfg = load_config(TINY, CycleConfig, ["rollout.samples_per_prompt=4", "select.threshold=8.5",
                                          "rollout.sampling.top_k=null", "run.name=night-1"])
    assert cfg.rollout.samples_per_prompt == 4 and cfg.select.threshold == 8.5
    assert cfg.rollout.sampling["top_k"] is None and cfg.run.name == "night-1"


@pytest.mark.parametrize("override, key, expected", [
    ("rollout.samples_per_promt=4", "rollout.samples_per_promt", "unknown key"),
    ("rollout.samples_per_prompt=four", "rollout.samples_per_prompt", "valid integer"),
    ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt", "greater than or equal to 1"),
    ("select.threshold=11", "select.threshold", "less than or equal to 10"),
    ("rollout.cfg_min=9", "rollout", "cfg_min (9.0) must be <= cfg_max"),
    ("model.backend=showo", "model.backend", "registered: bagel, embedded, janus"),
    ("rollout.sampling.temperature=0", "rollout.sampling.temperature", "greater than 0"),
    ("benchmark.sampling.steps=20", "benchmark.sampling.steps", "samples with temperature, top_k"),
    ("run.name=../x", "run.name", "invalid run name"),
])
def test_bad_values_fail_naming_file_key_and_expectation(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, CycleConfig, [override])
    msg = str(err.value)
    assert msg.startswith(str(TINY)) and f"{key}:" in msg and expected in msg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad, CycleConfig)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml", CycleConfig)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(TINY, CycleConfig, ["rollout"])


def test_cli_bad_config_fails_once_and_writes_nothing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "flows.cli", "config", "show", str(TINY),
                          "rollout.samples_per_prompt=-1"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "rollout.samples_per_prompt" in lines[0] and str(TINY) in lines[0]
    assert list(tmp_path.iterdir()) == []
