"""The model protocol: the one seam between the pipeline and any unified multimodal model.

Every role is batched (lists in, lists out) because stages call them over whole shards.
A backend lists the roles it supports in `roles`; a stage asks with `require_role` and
fails with one clear message on a backend that lacks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

ROLES = ("propose", "generate", "judge", "answer", "reflect", "loss")
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
    """One training example of a CPR kind (generation, caption, judgement, reflection), or a DPO pair."""

    kind: str
    input_text: str
    target_text: str | None = None
    input_image: Image.Image | None = None
    target_image: Image.Image | None = None
    rejected_image: Image.Image | None = None  # DPO only
    meta: dict[str, Any] = field(default_factory=dict)


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
                 temperature: float = 1.0, top_k: int | None = None) -> list[Image.Image]:
        """One image per prompt; the same (prompt, seed, params) gives the same image."""

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any) -> list[Judgement]:
        """Reasoning listing each checked fact, then a 0-10 score under `rubric`."""

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """A short text answer per (image, question); captioning asks for the prompt."""

    def reflect(self, prompts: list[str], images: list[Image.Image], seeds: list[int],
                cfg_scales: list[float], temperature: float = 1.0,
                top_k: int | None = None) -> list[Image.Image]:
        """A corrected image for each (prompt, flawed image)."""

    def loss(self, examples: list[CPRExample], weights: dict[str, float] | None = None) -> Any:
        """Mean training loss (a scalar tensor with grad) over a batch of CPR examples of any kinds: each kind's
        token-mean loss, weighted by its number of examples in the batch times `weights[kind]` (over the
        backend's defaults), so the CPR mixture sets each kind's share of the gradient."""

    # Optional: a backend whose prompt language has a grammar says which proposals are valid.
    # `canonical_prompt(text) -> (canonical_text | None, category | None, invalid_reason | None)`;
    # stages fall back to generic checks (non-empty, bounded length) when a backend lacks it.


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
