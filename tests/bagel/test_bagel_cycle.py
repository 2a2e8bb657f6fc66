"""A tiny random BAGEL through one whole self-play cycle as a real Prefect flow run: propose, rollout (the
rectified-flow sampler, CFG spread over the samples), judge (by the model itself), select, reconstruct (all four CPR
kinds), DeepSpeed post-training (flow matching + text cross-entropy), benchmark on the real-model suite with a real
vLLM engine as its evaluator, gate; the child is saved in the official layout."""

from pathlib import Path

import pyarrow.parquet as pq

from configs.loader import load_config
from configs.schema import CycleConfig
from configs.schema import PROJECT_ROOT
from flows.cycle import cycle_flow
from storage import Registry

RECIPE = PROJECT_ROOT / "configs/cycle/bagel-tiny-random.yaml"


def test_tiny_bagel_cycle(tmp_path, prefect_api, vlm_server):
    cfg = load_config(RECIPE, CycleConfig, [f"run.store={tmp_path}", f"benchmark.vlm.endpoint={vlm_server.url}"])
    s = cycle_flow(cfg)
    assert s["generation"]["judge"].get("unparsed", 0) == 0  # the constrained judge always gives a score
    assert s["self_play"] and s["selected_by"] == ["self"]
    for side in ("parent", "child"):
        for k in ("gen_acc_vlm", "und_acc_vlm", "non_unification", "unicycle_soft"):
            assert 0.0 <= s[side][k] <= 1.0
    reg = Registry(str(tmp_path))
    child = reg.require(s["child"]["checkpoint_id"])
    assert child.parent == s["parent"]["checkpoint_id"] != s["child"]["checkpoint_id"]
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"} <= set(child.files)
    post = s["posttrain"]
    assert post["train_s"] > 0 and set(post["heldout_after"]) <= {"generation", "caption", "judgement", "reflection"}
    rollouts = [r for f in Path(tmp_path, "bagel-tiny").glob("rollouts-*/part-*.parquet")
                for r in pq.read_table(f, columns=["prompt_id", "cfg_scale", "sampling"]).to_pylist()]
    assert sorted({r["cfg_scale"] for r in rollouts}) == [3.0, 8.0]  # the spread over a prompt's samples
    assert '"timestep_shift": 3.0' in rollouts[0]["sampling"]
    assert Path(s["report"]).exists()
