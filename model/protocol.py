"""The model protocols: the seams between the pipeline and any unified multimodal model.

Two of them, one per side of the pipeline:
- `UnifiedModel`: the inference roles the stages call (propose, generate, judge, answer, reflect). Every role is
  batched (lists in, lists out) because stages call them over whole shards. A backend lists the roles it
  supports in `roles`; a stage asks with `require_role` and fails with one clear message on a backend that
  lacks one.
- `TrainableModel`: what post-training needs of a backend: its module, per-kind loss terms, the log-probabilities
  DPO compares, token counts, and checkpoint files. The objectives themselves (the CPR mixture, DPO) are
  pipeline code, written once (tasks/objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image
from pydantic import Field

from configs.loader import Strict

ROLES = ("propose", "generate", "judge", "answer", "reflect")  # inference roles (training: TrainableModel)
CPR_KINDS = ("generation", "caption", "judgement", "reflection")


@dataclass(frozen=True)
class Judgement:
    """What a judge says about one (prompt, image): reasoning text, then a 0-10 score.

    `score` is None when the judge's output could not be parsed; `raw` keeps the output as it was.
    """

    reasoning: str
    score: int | None
    raw: str
    parse_ok: bool


@dataclass
class CPRExample:
    """One training example of a CPR kind (generation, caption, judgement, reflection), a DPO pair ('preference')
    or one scored sample of a prompt's group ('group', its advantage in `meta`)."""

    kind: str
    input_text: str
    target_text: str | None = None
    input_image: Image.Image | None = None
    target_image: Image.Image | None = None
    rejected_image: Image.Image | None = None  # DPO only
    meta: dict[str, Any] = field(default_factory=dict)


def sampling_policy(example: CPRExample) -> tuple[float, float]:
    """(temperature, CFG scale) that drew a group example's image (`meta['temperature']`, `meta['cfg_scale']`;
    1 when not recorded): the sampler's logits are u + s (c - u), divided by the temperature."""
    t, s = example.meta.get("temperature"), example.meta.get("cfg_scale")
    return 1.0 if t is None else float(t), 1.0 if s is None else float(s)


def guide(cond: Any, uncond: Any, scales: list[float], guided: list[int]) -> Any:
    """The sampler's guided logits for rows `guided` (their unconditional logits in `uncond`, in that order):
    u + s (c - u); other rows keep their conditional logits. Out of place, so gradients reach both passes."""
    if not guided:
        return cond
    import torch

    s = torch.tensor([scales[i] for i in guided], device=cond.device, dtype=cond.dtype)
    s = s.view(-1, *([1] * (cond.dim() - 1)))
    rows = torch.tensor(guided, device=cond.device)
    return cond.index_put((rows,), uncond + s * (cond[rows] - uncond))


class TokenSampling(Strict):
    """How a backend that decodes image tokens one by one samples them (the embedded model, Janus). A
    flow-matching backend registers its own (steps, timestep shift, CFG interval, ...): rollout and benchmark
    pass the recipe's `sampling` to generate as keywords, validated by the backend's class."""

    temperature: float = Field(1.0, gt=0, le=5.0)
    top_k: int | None = Field(None, ge=1)


class MissingRoleError(RuntimeError):
    pass


@runtime_checkable
class UnifiedModel(Protocol):
    """One parameter set that both understands and generates images."""

    model_id: str  # the checkpoint id: part of every stage fingerprint
    roles: frozenset[str]

    def propose(self, categories: list[str], examples: list[list[str]], seeds: list[int],
                temperature: float = 0.8) -> list[str]:
        """For each category and its 1-3 example prompts, a new prompt text."""

    def generate(self, prompts: list[str], seeds: list[int], cfg_scales: list[float],
                 **sampling: Any) -> list[Image.Image]:
        """One image per prompt; the same (prompt, seed, params) gives the same image. `sampling` are the fields
        of the backend's registered sampling parameters (TokenSampling for token-by-token image decoders)."""

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any) -> list[Judgement]:
        """Reasoning listing each checked fact, then a 0-10 score under `rubric`."""

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """A short text answer per (image, question); captioning asks for the prompt."""

    def reflect(self, prompts: list[str], images: list[Image.Image], seeds: list[int],
                cfg_scales: list[float], **sampling: Any) -> list[Image.Image]:
        """A corrected image for each (prompt, flawed image), with the same sampling parameters as generate."""

    # Optional: a backend whose prompt language has a grammar says which proposals are valid.
    # `canonical_prompt(text) -> (canonical_text | None, category | None, invalid_reason | None)`;
    # stages fall back to generic checks (non-empty, bounded length) when a backend lacks it.


@dataclass
class LossTerm:
    """One CPR kind's part of a training batch."""

    loss: Any  # scalar tensor with grad: the kind's token-mean loss (mean over its target tokens in the batch)
    count: int  # examples of the kind in the batch (those that gave at least one training sequence)


@runtime_checkable
class TrainableModel(Protocol):
    """What post-training needs of a backend. The losses are built from these by tasks/objectives.py."""

    net: Any  # the torch.nn.Module that trains (what the optimizer and DeepSpeed wrap)
    default_loss_weights: dict[str, float]  # the backend's per-kind weights, keyed by CPR kind (default 1)

    def loss_terms(self, examples: list[CPRExample]) -> dict[str, LossTerm]:
        """Per CPR kind present in the batch (in a fixed order): its token-mean loss with grad and its example
        count. Raises ValueError on an unknown kind. An empty dict when nothing in the batch trains."""

    def preference_logprobs(self, examples: list[CPRExample]) -> tuple[Any, Any, int]:
        """(chosen, rejected, tokens_per_image): the summed log-probabilities (B,), with grad, of each example's
        `target_image` and of its `rejected_image` given `input_text`, and the number of tokens of an image."""

    def image_token_logprobs(self, examples: list[CPRExample]) -> Any:
        """(B, tokens per image): the log-probability of each token of each example's `target_image` given its
        `input_text` and the tokens before it, with grad, under the policy that sampled it (`sampling_policy`: its
        classifier-free guidance and temperature; group-relative policy objectives)."""

    def tokens_per_example(self, example: CPRExample) -> int:
        """Tokens one training example runs through the model (a preference pair: both images' sequences)."""

    def weights_changed(self) -> None:
        """Call after training steps: the checkpoint id is recomputed from the new weights."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the checkpoint (safetensors weights + config) to `directory`; the model takes its id."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> "TrainableModel":
        """Load a checkpoint directory written by `save_pretrained`."""

    # Optional; the posttrain worker runs a backend without them (eager, whole losses, MFU over all parameters):
    # - `configure_training(compile: bool, loss_chunk: int) -> dict`: speed-only training settings, called once
    #   before DeepSpeed wraps `net` (compile the repeated layers, falling back to eager with one warning when the
    #   compiler fails; the output head + cross-entropy per `loss_chunk` tokens, 0: whole; frozen encoders'
    #   outputs kept per training image). Returns the settings in force, also kept as `train_speed` (a dict the
    #   worker writes into its metrics, updated if compile falls back).
    # - `params_on_path(kind: str) -> int`: the parameters whose matrix products every token of a `kind` example
    #   (a CPR kind, 'preference' or 'group') runs through in training; MFU counts 6 x this x tokens.


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (prompt, image) pairs: the model itself (judge_id 'self'), an oracle, a VLM."""

    judge_id: str

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any) -> list[Judgement]:
        ...


def require_role(model: Any, role: str) -> None:
    if role not in getattr(model, "roles", frozenset()):
        raise MissingRoleError(
            f"model {getattr(model, 'model_id', type(model).__name__)!r} does not support the "
            f"{role!r} role (it supports: {', '.join(sorted(getattr(model, 'roles', ()))) or 'none'})")
