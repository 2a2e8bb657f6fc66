"""The curriculum: prompts of the discard pool are offered again by propose and drawn with a larger budget."""

import pyarrow as pa
import pytest

from configs.schema import ProposeConfig, RolloutConfig
from storage import DatasetRef, build, fingerprint
from tasks import propose, rollout
from tasks.select import POOL
from tasks.stage import StageContext, read, run_in_process

FAILED = [("a large yellow circle and a green circle", "color_binding"),
          ("a small blue square and a small green circle", "shape_binding")]


@pytest.fixture
def ctx(base_model, tmp_path):
    return StageContext(store=str(tmp_path), run="cur", model_loader=lambda: base_model,
                        model_id=base_model.model_id, log=lambda _: None)


def pool(ctx) -> DatasetRef:
    rows = [{"prompt_id": f"p{i}", "prompt": p, "category": c, "max_score": 3, "cycles_tried": 1}
            for i, (p, c) in enumerate(FAILED)]
    ref = DatasetRef(store=ctx.store, run=ctx.run, stage="discard_pool", fingerprint=fingerprint("pool", rows, {},
                                                                                              None, "1"))
    build(ref, 1, lambda _: pa.Table.from_pylist(rows, schema=POOL), config={}, upstream={}, model_id=None,
          code_version="1", log=lambda _: None)
    return ref


def test_pool_prompts_return_with_a_larger_sampling_budget(ctx):
    prompts = run_in_process(propose, {"discard_pool": pool(ctx)}, ProposeConfig(num_prompts=10), ctx)["prompts"]
    offered = {r["prompt"]: r for r in read(prompts).to_pylist() if r["valid"]}
    assert {p for p, _ in FAILED} <= set(offered)
    assert {offered[p]["source"] for p, _ in FAILED} == {rollout.POOL_SOURCE}

    cfg = RolloutConfig(samples_per_prompt=2, pool_samples_per_prompt=5, cfg_min=1.0, cfg_max=1.5,
                        prompts_per_shard=4)
    drawn = read(run_in_process(rollout, {"prompts": prompts}, cfg, ctx)["rollouts"]).to_pylist()
    per = {}
    for r in drawn:
        per.setdefault(r["prompt_id"], []).append(r)
    for p, row in offered.items():
        rows = sorted(per[row["prompt_id"]], key=lambda r: r["sample_idx"])
        n = 5 if row["source"] == rollout.POOL_SOURCE else 2
        assert [r["sample_idx"] for r in rows] == list(range(n)), p
        # each prompt sweeps the whole CFG range over its own samples
        assert (rows[0]["cfg_scale"], rows[-1]["cfg_scale"]) == pytest.approx((1.0, 1.5))
    # without a pool budget every prompt gets samples_per_prompt, and the datasets of recipes without one keep
    # their fingerprints
    plain = run_in_process(rollout, {"prompts": prompts}, cfg.model_copy(update={"pool_samples_per_prompt": None}),
                           ctx)["rollouts"]
    assert read(plain).num_rows == 2 * len(offered)
    assert plain.fingerprint == rollout.plan({"prompts": prompts}, RolloutConfig(
        samples_per_prompt=2, cfg_min=1.0, cfg_max=1.5, prompts_per_shard=4), ctx).ref.fingerprint
