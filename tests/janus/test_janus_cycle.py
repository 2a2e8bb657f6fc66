"""A tiny random Janus through one whole self-play cycle as a real Prefect flow run: propose, rollout, judge
(by the model itself), select, reconstruct (all four CPR kinds), DeepSpeed post-training, benchmark on the
real-model suite with a real vLLM engine as its evaluator (a tiny random Qwen2-VL), gate."""

from pathlib import Path

import pyarrow.parquet as pq

from configs.loader import load_config
from configs.schema import CycleConfig
from flows.cycle import cycle_flow
from storage import Registry
from tests.janus.conftest import RECIPE


def test_tiny_janus_cycle(tmp_path, prefect_api, vlm_server):
    cfg = load_config(RECIPE, CycleConfig, [f"run.store={tmp_path}", f"benchmark.vlm.endpoint={vlm_server.url}"])
    s = cycle_flow(cfg)
    assert s["generation"]["judge"].get("unparsed", 0) == 0  # the constrained judge always gives a score
    assert s["self_play"] and s["selected_by"] == ["self"]
    for side in ("parent", "child"):
        for k in ("gen_acc_vlm", "und_acc_vlm", "non_unification", "unicycle_soft", "unicycle_hard",
                  "judge_vlm_agreement"):
            assert 0.0 <= s[side][k] <= 1.0
        assert "gen_acc_oracle" not in s[side] and "und_acc_gt" not in s[side]  # no oracle measures a real model
    assert s["delta_gen_acc_oracle"]["metric"] == "gen_acc_vlm"  # the gate's paired difference
    items = [r for f in Path(tmp_path, "benchmarks").glob("benchmark_items-*/part-*.parquet")
             for r in pq.read_table(f).to_pylist()]
    assert {r["evaluator"] for r in items} == {"vlm:tiny-qwen2-vl"}
    assert {r["category"] for r in items} == {"single_object", "two_object", "counting", "colors", "position",
                                              "color_attr"}
    reg = Registry(str(tmp_path))
    child = reg.require(s["child"]["checkpoint_id"])
    assert child.parent == s["parent"]["checkpoint_id"] != s["child"]["checkpoint_id"]
    assert "model.safetensors" in child.files and not any(n.endswith((".bin", ".pt")) for n in child.files)
    post = s["posttrain"]
    assert post["train_s"] > 0 and set(post["heldout_after"]) <= {"generation", "caption", "judgement", "reflection"}
    assert Path(s["report"]).exists()


def test_a_teacher_judged_cycle_is_labelled_not_self_play(tmp_path, prefect_api, vlm_server):
    """judge.judge=vlm: the external VLM selects the training data; the cycle runs, and its summary and report say
    it is not self-play."""
    vlm = "{model: tiny-qwen2-vl, endpoint: '%s'}" % vlm_server.url
    cfg = load_config(RECIPE, CycleConfig, [f"run.store={tmp_path}", f"benchmark.vlm.endpoint={vlm_server.url}",
                                            "judge.judge=vlm", f"judge.vlm={vlm}"])
    s = cycle_flow(cfg)
    assert not s["self_play"] and s["selected_by"] == ["vlm:tiny-qwen2-vl"]
    report = Path(s["report"]).read_text()
    assert "Teacher-judged, not self-play" in report and "vlm:tiny-qwen2-vl" in report.split("\n\n")[2]


def test_an_unreachable_evaluator_is_one_line_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from model.vlm.server import free_port

    store = tmp_path / "store"
    url = f"http://127.0.0.1:{free_port()}/v1"
    res = CliRunner().invoke(app, ["run", str(RECIPE), f"run.store={store}", f"benchmark.vlm.endpoint={url}"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: vlm judge: the endpoint") and url in lines[0]
    assert not store.exists() or not any(store.rglob("*.parquet"))
