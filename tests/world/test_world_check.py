"""`world_check` and the `world check` command (the 10,000-prompt run belongs to the CLI; here n is small)."""

import json

from typer.testing import CliRunner

from model.world import CATEGORIES, world_check
from model.world.cli import app


def test_world_check_meets_the_thresholds():
    res = world_check(n=500, seed=1)
    assert res["oracle_acc_gt"] >= 0.999
    assert res["oracle_reject_perturbed"] >= 0.995
    assert res["parse_roundtrip"] == 1.0
    assert res["oracle_acc_noisy"] >= 0.99 and res["oracle_reject_noisy"] >= 0.99
    assert res["distinct_prompts"] >= 100_000
    assert set(res["per_category"]) == set(CATEGORIES)
    assert all(r["n"] == 50 for r in res["per_category"].values())


def test_world_check_command_prints_json_last():
    out = CliRunner().invoke(app, ["check", "--n", "40", "--seed", "2"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["n"] == 40 and res["seed"] == 2
    for key in ("oracle_acc_gt", "oracle_reject_perturbed", "parse_roundtrip", "per_category"):
        assert key in res
    assert len(lines) > 1  # a human summary comes first
