"""The benchmark keeps each checkpoint's images, so another checkpoint's judge can be measured on them:
the judge's own change, with the images held fixed."""

import dataclasses

import pytest
import torch

from configs.schema import BenchmarkConfig
from model.embedded.umm import EmbeddedUMM
from tasks import benchmark, judge_shift, suite
from tasks.judge_shift import rejudge
from tasks.stage import StageContext, read
from tasks.stats import paired_delta

CFG = BenchmarkConfig(prompts_per_category=3, samples=2, cfg_scale=1.0, sampling={"temperature": 1.8},
                      bootstrap=200)


@pytest.fixture(scope="module")
def base():
    return EmbeddedUMM.from_pretrained()


@pytest.fixture(scope="module")
def items(base, tmp_path_factory):
    ctx = StageContext(store=str(tmp_path_factory.mktemp("bench")), run="b", model_loader=lambda: base,
                       model_id=base.model_id, log=lambda _: None)
    return ctx, benchmark.run(suite.run({}, CFG, ctx), CFG, ctx)["benchmark_items"]


def shifted_judge(base: EmbeddedUMM) -> EmbeddedUMM:
    """The base with its blocks' weights nudged: a different judge on the same images."""
    other = EmbeddedUMM.from_pretrained()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.net.blocks.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    other.weights_changed()
    assert other.model_id != base.model_id
    return other


def test_items_keep_their_images_and_the_same_judge_rescores_them_identically(base, items):
    _, ref = items
    rows = read(ref).to_pylist()
    assert all(len(r["images"]) == len(r["evaluator_ok"]) == CFG.samples for r in rows)
    again = rejudge(base, rows)
    assert [r["self_score"] for r in again] == [r["self_score"] for r in rows]  # PNG keeps the images exact


def test_judge_on_images_measures_another_judge_on_the_same_images(base, items):
    ctx, ref = items
    other = shifted_judge(base)
    octx = dataclasses.replace(ctx, model_loader=lambda: other, model_id=other.model_id, _model=None)
    out = judge_shift.run({"benchmark_items": ref}, CFG, octx)
    author = read(ref).to_pylist()
    judged = read(out["judge_on_images"]).to_pylist()
    assert {r["checkpoint_id"] for r in author} == {base.model_id}
    assert {r["checkpoint_id"] for r in judged} == {other.model_id}
    assert [r["evaluator_ok"] for r in judged] == [r["evaluator_ok"] for r in author]  # same images, same truth
    assert [r["self_score"] for r in judged] != [r["self_score"] for r in author]
    d = paired_delta(author, judged, "judge_oracle_agreement", CFG)
    assert d["ci_low"] - 1e-9 <= d["delta"] <= d["ci_high"] + 1e-9
    own = judge_shift.run({"benchmark_items": ref}, CFG, ctx)  # the author's own judge: no change at all
    same = paired_delta(author, read(own["judge_on_images"]).to_pylist(), "judge_oracle_agreement", CFG)
    assert same["delta"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0


def test_rejudge_refuses_items_without_images(base, items):
    _, ref = items
    rows = [{**r, "images": None} for r in read(ref).to_pylist()]
    with pytest.raises(ValueError, match="carry no images"):
        rejudge(base, rows)
