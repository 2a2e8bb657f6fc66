"""The post-training objectives, written once for every backend (model/protocol.py `TrainableModel`).

- `sft_loss`: the CPR mixture. Each kind's token-mean loss counts as many times as the batch has examples of that
  kind, times the kind's weight: the mixture's proportions set each kind's share of the gradient, as in UniCorn.
  (A plain per-kind mean gave the 1-in-14 reflection examples a sixth of the gradient, which cost 6 points of
  generation accuracy in the ablation.)
- `dpo_loss`: DPO over image tokens (chosen = target_image, rejected = rejected_image) against a frozen
  reference, plus the chosen image's NLL per token.

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
