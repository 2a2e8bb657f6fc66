"""Judges by name: 'self' (the model's own understanding), 'oracle' (the embedded world's exact oracle) and 'vlm'
(an external VLM served by vLLM, model/vlm).

The oracle measures; it never feeds training data: `tasks/select` refuses it. A 'vlm' judge may select, as a
teacher: such a run is labelled teacher-judged, not self-play, in its selections and report.
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


JUDGES = ("self", "oracle", "vlm")


def is_teacher(judge_id: str) -> bool:
    """An external judge whose scores may select training data (a teacher-judged run, not self-play)."""
    return judge_id.startswith("vlm:")


def check_training_judges(stage: str, judges: set[str]) -> None:
    """Training data comes from one judge: the model's own ('self'), or an external VLM as a teacher ('vlm:*');
    the oracle only measures. Raises ValueError naming the stage and the judges otherwise."""
    if len(judges) != 1 or not (judges == {"self"} or is_teacher(next(iter(judges)))):
        raise ValueError(f"{stage}: judgements come from {sorted(judges)}; training data comes from one judge: the "
                         "model's own ('self'), or an external VLM as a teacher ('vlm:*'); the oracle only measures")


def make_judge(name: str, ctx: Any, vlm: Any = None) -> Judge:
    if name == "self":
        return SelfJudge(ctx.model)
    if name == "oracle":
        return OracleJudge()
    if name == "vlm":
        from model.vlm import make_vlm

        judge = make_vlm(vlm)
        judge.check()  # one clear error before any image is sent
        return judge
    raise ValueError(f"unknown judge {name!r}: expected one of {', '.join(JUDGES)}")
