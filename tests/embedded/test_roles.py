"""Every role of the embedded model through the generic model protocol, with behaviour that could fail."""


import numpy as np
import pytest
import torch
from PIL import Image

from model.protocol import CPR_KINDS, ROLES, CPRExample, Judgement, UnifiedModel, require_role
from model.world import parse, parse_reasoning, verify
from tasks.objectives import dpo_loss, sft_loss


def test_protocol_and_roles(base_model):
    assert isinstance(base_model, UnifiedModel)
    assert set(ROLES) <= base_model.roles
    for r in ROLES:
        require_role(base_model, r)
    assert len(base_model.model_id) == 16 and int(base_model.model_id, 16) >= 0
    assert 1.5e6 < base_model.num_params() < 3e6


def test_generate_images(base_model, world_batch):
    prompts = world_batch[0][:8]
    imgs = base_model.generate(prompts, list(range(8)), [3.0] * 8, temperature=1.0, top_k=None)
    assert len(imgs) == 8 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in imgs)
    # the images are drawings, not noise: the oracle finds objects in nearly all of them
    found = [len(verify(p, im).scene.objects) > 0 for p, im in zip(prompts, imgs)]
    assert np.mean(found) >= 0.75
    greedy = base_model.generate(prompts[:2], [0, 1], [5.0, 5.0], temperature=0.0)
    assert greedy[0].size == (32, 32)
    with pytest.raises(ValueError):
        base_model.generate(prompts[:2], [0], [3.0, 3.0])


def test_judge_accepts_true_and_rejects_wrong_images(base_model, world_batch):
    prompts, true, wrong = world_batch
    jt = base_model.judge(prompts, true, None)
    jw = base_model.judge(prompts, wrong, None)
    for j in jt + jw:
        assert isinstance(j, Judgement) and j.parse_ok and 0 <= j.score <= 10
        got = parse_reasoning(j.reasoning)
        assert got is not None and got[1] == j.score  # the reasoning is the world's format
    assert np.mean([j.score >= 7 for j in jt]) >= 0.9
    assert np.mean([j.score < 7 for j in jw]) >= 0.75
    bad = base_model.judge(["a red zebra"], [true[0]], None)[0]
    assert not bad.parse_ok and bad.score is None


def test_answer_and_caption(base_model, world_batch):
    prompts, true, _ = world_batch
    from model.world import facts
    qs = [facts(parse(p).spec)[0] for p in prompts]
    ans = base_model.answer(true, [f.question for f in qs])
    assert all(isinstance(a, str) for a in ans)
    assert np.mean([a == f.expected for a, f in zip(ans, qs)]) >= 0.9  # true images: the prompt's facts hold
    caps = base_model.caption(true)
    # a caption is a prompt of the world that the image satisfies
    assert np.mean([verify(c, im).ok for c, im in zip(caps, true)]) >= 0.7


def test_propose_gives_valid_prompts_of_the_category(base_model, world_batch):
    prompts = world_batch[0]
    cats = [parse(p).spec.category for p in prompts]
    out = base_model.propose(cats, [[p] for p in prompts], list(range(len(prompts))), temperature=0.8)
    assert len(out) == len(prompts) and all(isinstance(o, str) for o in out)
    ok = [parse(o).ok and parse(o).spec.category == c for o, c in zip(out, cats)]
    assert np.mean(ok) >= 0.7
    again = base_model.propose(cats[:4], [[p] for p in prompts[:4]], [0, 1, 2, 3], temperature=0.8)
    assert again == out[:4]  # seeded
    with pytest.raises(ValueError):
        base_model.propose(["no_such_category"], [[prompts[0]]], [0])


def test_reflect_returns_corrections(base_model, world_batch):
    prompts, _, wrong = world_batch
    fixed = base_model.reflect(prompts, wrong, list(range(20)), [3.0] * 20)
    assert len(fixed) == 20 and all(im.size == (32, 32) for im in fixed)
    # the flawed inputs all fail the oracle; some corrections pass it
    assert not any(verify(p, w).ok for p, w in zip(prompts, wrong))
    assert np.mean([verify(p, f).ok for p, f in zip(prompts, fixed)]) >= 0.15


def _examples(model, world_batch):
    prompts, true, wrong = world_batch
    j = model.judge(prompts[:2], wrong[:2], None)
    ex = [CPRExample("generation", prompts[0], target_image=true[0]),
          CPRExample("caption", "which prompt made this image ?", target_text=prompts[1], input_image=true[1]),
          CPRExample("judgement", prompts[2], target_text=j[0].reasoning, input_image=wrong[0],
                     meta={"prompt": prompts[0]}),
          CPRExample("reflection", prompts[3], input_image=wrong[3], target_image=true[3])]
    return ex


def test_loss_per_kind_has_gradients(base_model, world_batch):
    ex = _examples(base_model, world_batch)
    assert {e.kind for e in ex} == set(CPR_KINDS)
    for e in ex:
        base_model.net.zero_grad()
        loss = sft_loss(base_model, [e])
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        g = sum(float(p.grad.abs().sum()) for p in base_model.net.parameters() if p.grad is not None)
        assert g > 0, e.kind
    base_model.net.zero_grad()
    with pytest.raises(ValueError):
        sft_loss(base_model, [CPRExample("dance", "x")])


def test_judgement_loss_targets_the_judges_own_answers(base_model, world_batch):
    prompts, true, wrong = world_batch
    j = base_model.judge([prompts[0]], [wrong[0]], None)[0]
    kind, seqs = base_model.example_seqs(CPRExample("judgement", prompts[0], target_text=j.reasoning,
                                                    input_image=wrong[0]))
    fact_ok, _ = parse_reasoning(j.reasoning)
    answers = [base_model.vocab.itos[t] for s, tg in seqs for t, m in zip(s, tg) if m and t != base_model.vocab.EOS]
    assert kind == "question" and len(answers) == len(fact_ok)
    assert set(answers) <= {"yes", "no"}
    # one fact a sequence, the context the judge asks it in (yes_prob: the image, then one question)
    assert len(seqs) == len(fact_ok) and all(s.count(base_model.vocab.Q) == 1 for s, _ in seqs)


def test_dpo_helpers(base_model, world_batch):
    import copy
    prompts, true, wrong = world_batch
    lp = base_model.sequence_logprob(prompts[:4], true[:4])
    assert lp.shape == (4,) and (lp < 0).all() and lp.requires_grad
    # the base model prefers a true image of the prompt to a perturbed one, on average
    lw = base_model.sequence_logprob(prompts, wrong)
    lt = base_model.sequence_logprob(prompts, true)
    assert float((lt - lw).mean().detach()) > 0
    ref = copy.deepcopy(base_model)
    ex = [CPRExample("generation", p, target_image=t, rejected_image=w) for p, t, w in zip(prompts[:4], true, wrong)]
    loss = dpo_loss(base_model, ref, ex, beta=0.1, nll_weight=0.0)
    assert abs(float(loss.detach()) - float(np.log(2))) < 1e-3  # policy == reference: margin 0
    loss.backward()
    base_model.net.zero_grad()
