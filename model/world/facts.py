"""Facts a prompt asserts, how a scene answers them, and the rubric that turns verdicts into a 0-10 score.

The oracle and the model's own judge share this module: both answer each fact's yes/no question (the oracle from
the detected scene, the model from pixels), then call the same `score` and `reasoning_text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from .language import NUMBER_WORDS, PromptSpec, Thing
from .scene import Obj, Scene
from .vocab import RELATIONS, REL_MARGIN, SIZE_PX


@dataclass(frozen=True)
class Fact:
    id: str
    kind: str  # presence, letter, count, relation, size, absence, background, total
    question: str
    expected: str  # "yes" / "no"
    primary: bool
    args: tuple = ()  # what `answer` needs: Things, a relation key, a background, a number


def _is_are(n: int, phrase: str) -> str:
    return f"{'is' if n == 1 else 'are'} there exactly {NUMBER_WORDS[n]} {phrase}?"


def facts(spec: PromptSpec) -> list[Fact]:
    """Primary facts (what the prompt demands), then one secondary fact: no objects beyond those named."""
    out: list[tuple] = []
    for t in spec.things:
        if t.count is not None:
            out.append(("count", _is_are(t.count, t.describe(plural=t.count > 1)), "yes", True, (t,)))
        else:
            out.append(("letter" if t.letter else "presence", f"is there {t.text()}?", "yes", True, (t,)))
    if spec.relation:
        a, b = spec.things[:2]
        kind = "size" if spec.relation in ("bigger", "smaller") else "relation"
        out.append((kind, f"is the {a.describe()} {RELATIONS[spec.relation]} the {b.describe()}?", "yes", True,
                    (a, spec.relation, b)))
    if spec.negated:
        out.append(("absence", f"are there any {spec.negated.describe(plural=True)}?", "no", True, (spec.negated,)))
    if spec.background:
        out.append(("background", f"is the background {spec.background}?", "yes", True, (spec.background,)))
    n = spec.n_objects
    out.append(("total", _is_are(n, "object" if n == 1 else "objects"), "yes", False, (n,)))
    return [Fact(f"{i}:{k}", k, q, e, p, a) for i, (k, q, e, p, a) in enumerate(out)]


def _holds(rel: str, a: Obj, b: Obj) -> bool:
    if rel == "bigger":
        return SIZE_PX[a.size] > SIZE_PX[b.size]
    if rel == "smaller":
        return SIZE_PX[a.size] < SIZE_PX[b.size]
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left": dx >= REL_MARGIN, "right": -dx >= REL_MARGIN, "above": dy >= REL_MARGIN,
            "below": -dy >= REL_MARGIN}[rel]


def answer(fact: Fact, scene: Scene) -> str:
    """The true yes/no answer to a fact's question for a scene (ground truth or detected)."""
    objs = scene.objects
    if fact.kind in ("presence", "letter", "absence"):
        yes = any(fact.args[0].matches(o) for o in objs)
    elif fact.kind == "count":
        t: Thing = fact.args[0]
        yes = sum(t.matches(o) for o in objs) == t.count
    elif fact.kind in ("relation", "size"):
        a, rel, b = fact.args
        yes = any(_holds(rel, x, y) for x in objs if a.matches(x) for y in objs if y is not x and b.matches(y))
    elif fact.kind == "background":
        yes = scene.background == fact.args[0]
    elif fact.kind == "total":
        yes = len(objs) == fact.args[0]
    else:
        raise ValueError(f"unknown fact kind {fact.kind!r}")
    return "yes" if yes else "no"


def check_facts(spec: PromptSpec, scene: Scene) -> list[bool]:
    return [answer(f, scene) == f.expected for f in facts(spec)]


class Rubric(BaseModel):
    """Score rules. All primary facts right: `full`, less `secondary_penalty` per wrong secondary fact (at most
    `max_secondary_penalty`), so 8-10. Any primary fact wrong: `partial_max` x share of primary facts right,
    then capped by the kind of each wrong fact (a wrong count scores at most 2; a wrong relation with both objects
    present lands in 4-5, a missing object in 0-3). Everything below 7 is a rejection at the default threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    full: int = 10
    secondary_penalty: int = 1
    max_secondary_penalty: int = 2
    partial_max: int = 6
    caps: dict[str, int] = Field(default_factory=lambda: {
        "presence": 3, "letter": 3, "count": 2, "relation": 5, "size": 5, "absence": 3, "background": 5})


def score(spec: PromptSpec, fact_ok: list[bool], rubric: Rubric | None = None) -> int:
    rubric = rubric or Rubric()
    fs = facts(spec)
    if len(fact_ok) != len(fs):
        raise ValueError(f"{len(fact_ok)} verdicts for {len(fs)} facts")
    primary = [ok for f, ok in zip(fs, fact_ok) if f.primary]
    if all(primary):
        wrong = sum(not ok for f, ok in zip(fs, fact_ok) if not f.primary)
        return rubric.full - min(wrong * rubric.secondary_penalty, rubric.max_secondary_penalty)
    s = round(rubric.partial_max * sum(primary) / len(primary))
    for f, ok in zip(fs, fact_ok):
        if f.primary and not ok:
            s = min(s, rubric.caps.get(f.kind, rubric.partial_max))
    return max(0, s)


def reasoning_text(spec: PromptSpec, fact_list: list[Fact] | None, fact_ok: list[bool], score_: int) -> str:
    """One line per fact: '<question> <observed answer>, correct|wrong.' then 'score: N'.
    The observed answer is implied by the verdict: the expected answer when correct, the other one when wrong."""
    fact_list = facts(spec) if fact_list is None else fact_list
    flip = {"yes": "no", "no": "yes"}
    lines = [f"{f.question} {f.expected if ok else flip[f.expected]}, {'correct' if ok else 'wrong'}."
             for f, ok in zip(fact_list, fact_ok)]
    return "\n".join(lines + [f"score: {score_}"])


_LINE = re.compile(r"\?\s*(yes|no)\s*,?\s*(correct|wrong)")
_SCORE = re.compile(r"score\s*:?\s*(\d+)")


def parse_reasoning(text: str) -> tuple[list[bool], int] | None:
    """(per-fact verdicts, score) from a reasoning text, or None when no valid score is found."""
    if not isinstance(text, str):
        return None
    text = text.lower()
    scores = _SCORE.findall(text)
    if not scores or not 0 <= int(scores[-1]) <= 10:
        return None
    return [v == "correct" for _, v in _LINE.findall(text)], int(scores[-1])
