"""The post-training objectives (tasks/objectives.py) over the TrainableModel protocol: the CPR mixture and DPO,
on a stub backend (exact arithmetic), the shipped embedded base and a tiny random Janus."""

import math

import pytest
import torch
from PIL import Image

from model.protocol import CPR_KINDS, ROLES, CPRExample, LossTerm, TrainableModel, UnifiedModel
from tasks.objectives import dpo_loss, grpo_loss, sft_loss


pytestmark = pytest.mark.usefixtures("one_thread")


class Stub:
    """A TrainableModel whose kind losses are fixed multiples of one parameter: the mixture is exact arithmetic."""

    default_loss_weights = {"generation": 1.0, "caption": 0.5}
    base = {"generation": 1.0, "caption": 2.0, "judgement": 4.0, "reflection": 8.0}

    def __init__(self):
        self.net = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.fill_(1.0)

    def loss_terms(self, examples):
        count = {}
        for e in examples:
            count[e.kind] = count.get(e.kind, 0) + 1
        w = self.net.weight.sum()
        return {k: LossTerm(w * self.base[k], n) for k, n in count.items()}


def _batch(**counts):
    return [CPRExample(k, "x") for k, n in counts.items() for _ in range(n)]


def test_mixture_weighs_each_kind_by_count_times_weight():
    m = Stub()
    loss = sft_loss(m, _batch(generation=3, caption=1, judgement=2))
    # weights: generation 1 (default), caption 0.5 (default), judgement 1 (unlisted)
    expected = (3 * 1.0 * 1.0 + 1 * 0.5 * 2.0 + 2 * 1.0 * 4.0) / (3 * 1.0 + 1 * 0.5 + 2 * 1.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    # not a plain mean over kinds, nor over examples
    assert float(loss.detach()) != pytest.approx((1.0 + 2.0 + 4.0) / 3, rel=1e-3)
    assert float(loss.detach()) != pytest.approx((3 * 1.0 + 2.0 + 2 * 4.0) / 6, rel=1e-3)


def test_weights_override_the_backend_defaults():
    m = Stub()
    b = _batch(generation=2, caption=2, reflection=1)
    loss = sft_loss(m, b, {"caption": 3.0, "reflection": 0.0})
    expected = (2 * 1.0 * 1.0 + 2 * 3.0 * 2.0 + 0.0) / (2 * 1.0 + 2 * 3.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(sft_loss(m, b).detach()) != pytest.approx(expected, rel=1e-3)


def test_empty_batch_gives_a_zero_loss_with_grad():
    m = Stub()
    loss = sft_loss(m, [])
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert m.net.weight.grad is not None and float(m.net.weight.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------- the embedded backend
@pytest.fixture(scope="module")
def world(world_batch):
    """Six of the shared prompts with their true and perturbed renders."""
    return tuple(x[:6] for x in world_batch)


@pytest.fixture(scope="module")
def embedded(base_model):
    return base_model


def _cpr(model, world):
    prompts, true, wrong = world
    js = model.judge(prompts[:2], wrong[:2], None)
    return ([CPRExample("generation", p, target_image=t) for p, t in zip(prompts[:3], true)]
            + [CPRExample("caption", "which prompt made this image ?", target_text=prompts[3], input_image=true[3])]
            + [CPRExample("judgement", p, target_text=j.reasoning, input_image=w, meta={"prompt": p})
               for p, j, w in zip(prompts[:2], js, wrong)]
            + [CPRExample("reflection", prompts[4], input_image=wrong[4], target_image=true[4])])


def test_embedded_is_both_protocols_and_its_mixture_matches_its_terms(embedded, world):
    assert isinstance(embedded, UnifiedModel) and isinstance(embedded, TrainableModel)
    assert "loss" not in ROLES and set(ROLES) <= embedded.roles  # training is not an inference role
    assert embedded.default_loss_weights["judgement"] == embedded.config.loss_weights["question"]
    ex = _cpr(embedded, world)
    with torch.no_grad():
        terms = embedded.loss_terms(ex)
        assert list(terms) == ["generation", "judgement", "caption", "reflection"]  # one forward, KINDS order
        assert {k: t.count for k, t in terms.items()} == {"generation": 3, "judgement": 2, "caption": 1,
                                                          "reflection": 1}
        for weights in (None, {"judgement": 3.0, "generation": 0.25}):
            w = {**embedded.default_loss_weights, **(weights or {})}
            hand = (sum(w[k] * t.count * float(t.loss) for k, t in terms.items())
                    / sum(w[k] * t.count for k, t in terms.items()))
            assert float(sft_loss(embedded, ex, weights)) == pytest.approx(hand, rel=1e-5)
    # a judgement whose reasoning does not parse trains nothing: the batch is empty
    empty = sft_loss(embedded, [CPRExample("judgement", world[0][0], target_text="?", input_image=world[1][0])])
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    with pytest.raises(ValueError):
        embedded.loss_terms([CPRExample("dance", "x")])


def test_dpo_against_itself_is_log2_minus_the_nll_term(embedded, world):
    prompts, true, wrong = world
    pairs = [CPRExample("preference", p, target_image=t, rejected_image=w) for p, t, w in zip(prompts, true, wrong)]
    with torch.no_grad():
        pc, pr, n = embedded.preference_logprobs(pairs)
        assert pc.shape == pr.shape == (len(pairs),) and n == embedded.codebook.tokens_per_image
        assert float(dpo_loss(embedded, embedded, pairs, beta=0.1, nll_weight=0.0)) == pytest.approx(math.log(2),
                                                                                                  abs=1e-6)
        got = float(dpo_loss(embedded, embedded, pairs, beta=0.1, nll_weight=0.5))
    assert got == pytest.approx(math.log(2) - 0.5 * float(pc.mean()) / n, rel=1e-6)
    assert got > math.log(2)  # log-probabilities are negative: the NLL term adds
    gen = CPRExample("generation", prompts[0], target_image=true[0])
    assert embedded.tokens_per_example(pairs[0]) == 2 * embedded.tokens_per_example(gen) > 0


# ---------------------------------------------------------------------- the Janus backend (tiny, random)
@pytest.fixture(scope="module")
def janus():
    import yaml

    from configs.schema import PROJECT_ROOT
    from model.janus import JanusUMM

    recipe = yaml.safe_load((PROJECT_ROOT / "configs/cycle/janus-tiny-random.yaml").read_text())
    return JanusUMM.random(recipe["model"]["janus_config"], device="cpu", dtype="float32")


def test_janus_gives_terms_for_every_kind_and_a_trainable_mixture(janus):
    assert isinstance(janus, TrainableModel)
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    blue = Image.new("RGB", (32, 32), (30, 30, 200))
    ex = [CPRExample("generation", "a red circle", target_image=red),
          CPRExample("caption", "Write the prompt of this image.", target_text="a red circle", input_image=red),
          CPRExample("generation", "", target_image=blue),
          CPRExample("judgement", "a red circle", target_text="the circle is red", input_image=red,
                     meta={"prompt": "a red circle", "score": 9}),
          CPRExample("reflection", "a blue square", input_image=red, target_image=blue)]
    janus.net.zero_grad(set_to_none=True)
    terms = janus.loss_terms(ex)
    assert set(terms) == set(CPR_KINDS) and terms["generation"].count == 2
    assert all(t.loss.dim() == 0 and t.loss.requires_grad and torch.isfinite(t.loss) for t in terms.values())
    loss = sft_loss(janus, ex, {"reflection": 0.5})
    w = {"generation": 2.0, "caption": 1.0, "judgement": 1.0, "reflection": 0.5}
    hand = sum(w[k] * float(t.loss.detach()) for k, t in terms.items()) / sum(w.values())
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(hand, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in janus.net.model.language_model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert janus.net.model.generation_head.proj_out.weight.grad is not None
    assert janus.net.model.vqmodel.quantize.embedding.weight.grad is None  # the VQ model stays frozen
    janus.net.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------- GRPO, on both backends
def _groups(prompts, images, advantages):
    return [CPRExample("group", p, target_image=im, meta={"advantage": a})
            for p, im, a in zip(prompts, images, advantages)]


def test_grpo_at_the_reference_is_minus_the_mean_advantage_and_raises_the_better_images(embedded, world):
    prompts, true, wrong = world
    ex = _groups(prompts[:3] * 2, list(true[:3]) + list(wrong[:3]), [1.0] * 3 + [-1.0] * 3)
    with torch.no_grad():
        per_token = embedded.image_token_logprobs(ex)
        assert per_token.shape == (6, embedded.codebook.tokens_per_image)
        # ratio 1 and KL 0 at the reference: the loss is minus the mean advantage
        assert float(grpo_loss(embedded, embedded, ex)) == pytest.approx(0.0, abs=1e-6)
        skewed = _groups(prompts[:2], true[:2], [2.0, 0.5])
        assert float(grpo_loss(embedded, embedded, skewed)) == pytest.approx(-1.25, abs=1e-6)
    # one gradient step on the policy: positive-advantage images gain log-probability, negative ones lose it
    import copy

    policy = copy.deepcopy(embedded)
    opt = torch.optim.SGD(policy.net.parameters(), lr=0.05)
    grpo_loss(policy, embedded, ex, kl_beta=0.0).backward()
    opt.step()
    with torch.no_grad():
        delta = (policy.image_token_logprobs(ex) - embedded.image_token_logprobs(ex)).sum(-1)
    assert float(delta[:3].mean()) > 0 > float(delta[3:].mean())


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_embedded_group_logprobs_are_the_policy_that_sampled_them(embedded, world, cfg):
    """The ratios GRPO takes are under the sampler's own policy: its first token (the background) drawn 600
    times at temperature 1.8 (and CFG 1.5) has the frequencies the log-probabilities say, and those
    probabilities, over every background, sum to one (only image codes, the decode's bias, guidance, the
    temperature)."""
    prompt, n = world[0][0], 600
    images = embedded.generate([prompt] * n, list(range(n)), [cfg] * n, temperature=1.8)
    with torch.no_grad():
        lp = {t: embedded.image_token_logprobs([CPRExample("group", prompt, target_image=im,
                                                           meta={"advantage": 0.0, "temperature": t, "cfg_scale": cfg})
                                                for im in images])[:, 0] for t in (1.8, None)}
    first = embedded.image_codes(images)[:, 0].tolist()
    prob = {c: math.exp(float(lp[1.8][first.index(c)])) for c in set(first)}
    assert [math.exp(float(x)) for x in lp[1.8]] == pytest.approx([prob[c] for c in first], rel=1e-4)
    for c, p in prob.items():
        assert first.count(c) / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-3)
    assert sum(prob.values()) == pytest.approx(1.0, abs=0.02)
    # without a recorded temperature the policy is the model at temperature 1: a sharper distribution
    top = max(prob, key=prob.get)
    assert math.exp(float(lp[None][first.index(top)])) > prob[top]


@pytest.mark.parametrize("backend", ["embedded", "janus"])
def test_group_logprobs_guide_between_the_unconditional_and_the_conditional_policy(backend, request, world):
    """At CFG 0 the sampler's policy is the unconditional one, at 1 the conditional one; rows of a batch keep
    their own scale."""
    model = request.getfixturevalue(backend)
    image = world[1][0] if backend == "embedded" else Image.new("RGB", (32, 32), (200, 30, 30))
    prompt = world[0][0]

    def lp(scales, text=prompt):
        return model.image_token_logprobs([CPRExample("group", text, target_image=image,
                                                      meta={"advantage": 0.0, "cfg_scale": s}) for s in scales])

    with torch.no_grad():
        mixed = lp([0.0, 1.0, 3.0])
        assert mixed[1].tolist() == pytest.approx(lp([1.0])[0].tolist(), abs=1e-5)
        if backend == "embedded":  # its unconditional row is the prompt left out
            uncond = lp([1.0], text="")[0]
        else:  # Janus's: the prompt's tokens padded out, as transformers draws it
            uncond = model.image_logprob([model._gen_prefix(prompt, uncond=True)], model.image_codes([image]),
                                         per_token=True)[0]
        assert mixed[0].tolist() == pytest.approx(uncond.tolist(), abs=1e-5)
        assert mixed[2].tolist() == pytest.approx(lp([3.0])[0].tolist(), abs=1e-5)
        assert not torch.allclose(mixed[2], mixed[1])


def test_grpo_clips_the_ratio_and_charges_kl_away_from_the_reference(embedded, world):
    prompts, true, _ = world

    class Shifted:  # the reference's log-probabilities moved by a constant per token
        def __init__(self, shift):
            self.shift = shift

        def image_token_logprobs(self, examples):
            return embedded.image_token_logprobs(examples) + self.shift

    ex = _groups(prompts[:2], true[:2], [1.0, 1.0])
    with torch.no_grad():
        # policy / reference ratio e^0.5 > 1.2 with a positive advantage: clipped at 1.2
        assert float(grpo_loss(embedded, Shifted(-0.5), ex, kl_beta=0.0)) == pytest.approx(-1.2, rel=1e-5)
        kl = math.exp(-0.5) + 0.5 - 1  # k3 at log-ratio 0.5, per token
        assert float(grpo_loss(embedded, Shifted(-0.5), ex, kl_beta=1.0)) == pytest.approx(-1.2 + kl, rel=1e-5)


def test_janus_token_logprobs_sum_to_its_image_logprob(janus):
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    ex = _groups(["a red circle", "a blue square"], [red, red], [1.0, -1.0])
    with torch.no_grad():
        per_token = janus.image_token_logprobs(ex)
        pc, _, n = janus.preference_logprobs([CPRExample("preference", e.input_text, target_image=red,
                                                         rejected_image=red) for e in ex])
    assert per_token.shape == (2, n) and per_token.sum(-1).tolist() == pytest.approx(pc.tolist(), rel=1e-5)
    assert janus.tokens_per_example(ex[0]) == janus.tokens_per_example(CPRExample("generation", "a red circle",
                                                                                  target_image=red))
    loss = grpo_loss(janus, janus, ex)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and loss.requires_grad
