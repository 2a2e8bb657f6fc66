"""The post-training objectives, written once for every backend (model/protocol.py `TrainableModel`).

- `sft_loss`: the CPR mixture. Each kind's token-mean loss counts as many times as the batch has examples of that
  kind, times the kind's weight: the mixture's proportions set each kind's share of the gradient, as in UniCorn.
  (A plain per-kind mean gave the 1-in-14 reflection examples a sixth of the gradient, which cost 6 points of
  generation accuracy in the ablation.)
- `dpo_loss`: DPO over image tokens (chosen = target_image, rejected = rejected_image) against a frozen
  reference, plus the chosen image's NLL per token.

- `grpo_loss`: group-relative policy optimisation over image tokens. Each of a prompt's N rollouts carries the
  advantage (score - group mean) / group std from the model's own judge; the loss is PPO's clipped surrogate per
  token against the rollout policy (the parent, which is also the frozen KL reference), plus beta x the k3 estimate
  of KL(policy || reference). For a flow-matching backend the same objective runs over denoising steps: the
  per-token log-probability becomes the Gaussian log-density of each sampled step (Flow-GRPO), the rest is equal.

Backends give the per-kind terms (`loss_terms`, from whatever forward passes suit them) and the log-probabilities
(`preference_logprobs`); the float operations here are the ones the backends' own losses performed, in the same
order, so a training run's weights do not change with the split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.protocol import CPRExample


def _zero(model: Any) -> torch.Tensor:
    """A zero loss that still has a graph to the trainable parameters (every rank must call backward)."""
    return sum(p.sum() for p in model.net.parameters() if p.requires_grad) * 0.0


def mixture_weights(model: Any, weights: dict[str, float] | None = None) -> dict[str, float]:
    """The per-kind weights: the backend's defaults, overridden by `weights` (both keyed by CPR kind)."""
    return {**model.default_loss_weights, **(weights or {})}


def sft_loss(model: Any, examples: list[CPRExample], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Mean training loss (a scalar tensor with grad) over CPR examples of any kinds: the sum over kinds of
    (weight x count) x (the kind's token-mean loss), divided by the sum of weight x count. A batch that trains
    nothing gives a zero loss with grad."""
    terms = model.loss_terms(examples)
    w = mixture_weights(model, weights)
    total, wsum = None, 0.0
    for kind, term in terms.items():
        wk = float(w.get(kind, 1.0)) * term.count
        total = term.loss * wk if total is None else total + term.loss * wk
        wsum += wk
    if total is None:
        return _zero(model)
    return total / wsum if wsum > 0 else total


def dpo_loss(model: Any, reference: Any, examples: list[CPRExample], beta: float = 0.1,
             nll_weight: float = 1.0) -> torch.Tensor:
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))), averaged over pairs, minus nll_weight x the chosen image's
    mean log-probability per token; pc/pr from `model` (with grad), rc/rr from `reference` (no grad)."""
    pc, pr, n_tokens = model.preference_logprobs(examples)
    with torch.no_grad():
        rc, rr, _ = reference.preference_logprobs(examples)
    rc, rr = rc.to(pc.device), rr.to(pc.device)
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    if nll_weight:
        loss = loss - nll_weight * pc.mean() / n_tokens
    return loss


def grpo_loss(model: Any, reference: Any, examples: list[CPRExample], clip: float = 0.2,
              kl_beta: float = 0.04) -> torch.Tensor:
    """-mean over tokens of min(r A, clip(r, 1 - clip, 1 + clip) A) + kl_beta x mean (e^(q - p) - (q - p) - 1),
    with r = e^(p - q), p the policy's token log-probabilities (with grad), q the reference's (the parent drew the
    rollouts, so it is the old policy too) and A each example's `meta['advantage']`."""
    lp = model.image_token_logprobs(examples)
    with torch.no_grad():
        ref = reference.image_token_logprobs(examples).to(lp.device)
    adv = torch.tensor([float(e.meta["advantage"]) for e in examples], device=lp.device)[:, None]
    ratio = torch.exp(lp - ref)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    return -surrogate.mean() + kl_beta * kl.mean()
