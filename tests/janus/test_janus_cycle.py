"""A tiny random Janus through one whole self-play cycle as a real Prefect flow run: propose, rollout, judge
(by the model itself), select, reconstruct (all four CPR kinds), DeepSpeed post-training, benchmark, gate."""

from pathlib import Path

from configs.loader import load_config
from configs.schema import CycleConfig
from flows.cycle import cycle_flow
from storage import Registry
from tests.janus.conftest import RECIPE


def test_tiny_janus_cycle(tmp_path, prefect_api):
    cfg = load_config(RECIPE, CycleConfig, [f"run.store={tmp_path}"])
    s = cycle_flow(cfg)
    assert s["generation"]["judge"].get("unparsed", 0) == 0  # the constrained judge always gives a score
    for side in ("parent", "child"):
        for k in ("gen_acc_oracle", "und_acc_gt", "non_unification"):
            assert 0.0 <= s[side][k] <= 1.0
    reg = Registry(str(tmp_path))
    child = reg.require(s["child"]["checkpoint_id"])
    assert child.parent == s["parent"]["checkpoint_id"] != s["child"]["checkpoint_id"]
    assert "model.safetensors" in child.files and not any(n.endswith((".bin", ".pt")) for n in child.files)
    post = s["posttrain"]
    assert post["train_s"] > 0 and set(post["heldout_after"]) <= {"generation", "caption", "judgement", "reflection"}
    assert Path(s["report"]).exists()
