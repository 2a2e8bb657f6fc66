"""The command line lists what exists, each command with a help line."""

import json
import re

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _commands(help_text):
    return re.findall(r"│ (\w[\w-]*)\s{2,}(\S.*?)\s*│", help_text)


def test_help_lists_commands_with_help_lines():
    res = runner.invoke(app, ["--help"], terminal_width=120)
    assert res.exit_code == 0
    cmds = dict(_commands(res.output))
    for name in ("bench", "config", "checkpoints"):
        assert name in cmds and len(cmds[name]) > 5
    for group in cmds:
        sub = runner.invoke(app, [group, "--help"], terminal_width=120)
        if "Commands" in sub.output:
            assert all(len(text) > 5 for _, text in _commands(sub.output.split("Commands")[1]))


def test_bench_storage_prints_json():
    res = runner.invoke(app, ["bench", "storage", "--rows", "400", "--parts", "4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["rows"] == 400 and out["reused"] is True and out["write_rows_per_s"] > 0


def test_stage_rerun_names_what_is_wrong_before_any_work(tmp_path):
    res = runner.invoke(app, ["stage", "judge", "--run", "nope", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "no recorded run 'nope'" in res.output
    res = runner.invoke(app, ["stage", "judge", "--run", "../x", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "invalid run name" in res.output
    assert not any(tmp_path.iterdir()), "nothing written for a refused command"
