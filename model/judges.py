"""Judges by name: 'self' (the model's own understanding) and 'oracle' (the embedded world's exact oracle).

The oracle measures; it never feeds training data during self-play: `tasks/select` refuses any judge but 'self'
(tasks/select.py).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from model.protocol import Judge, Judgement, require_role


class SelfJudge:
    """The model judges its own images with its own understanding."""

    judge_id = "self"

    def __init__(self, model: Any):
        require_role(model, "judge")
        self.model = model

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any) -> list[Judgement]:
        return self.model.judge(prompts, images, rubric)


class OracleJudge:
    """ShapeWorld's exact oracle: detects the scene and checks every fact the prompt asserts."""

    judge_id = "oracle"

    def judge(self, prompts: list[str], images: list[Image.Image], rubric: Any) -> list[Judgement]:
        from model.world import Rubric, verify

        rub = Rubric.model_validate(rubric or {})
        out = []
        for prompt, image in zip(prompts, images):
            v = verify(prompt, image, rub)
            out.append(Judgement(reasoning=v.reasoning, score=v.score if v.parse_ok else None,
                                 raw=v.reasoning, parse_ok=v.parse_ok))
        return out


JUDGES = ("self", "oracle")


def make_judge(name: str, ctx: Any) -> Judge:
    if name == "self":
        return SelfJudge(ctx.model)
    if name == "oracle":
        return OracleJudge()
    raise ValueError(f"unknown judge {name!r}: expected 'self' or 'oracle'")
