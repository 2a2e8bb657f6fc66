"""UniCycle questions about what a prompt asserts (yes/no, multiple choice, open-ended) and their exact grader."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .facts import facts
from .language import NUMBER_WORDS, parse
from .vocab import BACKGROUNDS, COLORS, LETTERS, PLURALS, SHAPES, SPATIAL, tokenize


@dataclass(frozen=True)
class Question:
    kind: str  # "yes_no", "multiple_choice", "open"
    text: str
    answer: str  # reference answer, one of `choices` for multiple choice
    choices: tuple[str, ...] = ()


def _ask(rng: random.Random, text: str, answer: str, pool) -> list[Question]:
    """The same question twice: open-ended, and multiple choice among the answer and up to 3 distractors."""
    choices = [answer] + rng.sample([p for p in pool if p != answer], min(3, len(pool) - 1))
    rng.shuffle(choices)
    mc = f"{text} choices: {', '.join(choices)}."
    return [Question("open", text, answer), Question("multiple_choice", mc, answer, tuple(choices))]


def questions(prompt_text: str, rng: random.Random) -> list[Question]:
    """Questions whose reference answers follow from the prompt alone; [] for an invalid prompt."""
    parsed = parse(prompt_text)
    if not parsed.ok:
        return []
    spec = parsed.spec
    out = [Question("yes_no", f.question, f.expected) for f in facts(spec) if f.primary]
    things = spec.things
    for t in things:
        # Attribute questions only where the other attribute names the object unambiguously.
        if t.shape != "letter" and sum(x.shape == t.shape for x in things) == 1:
            noun = f"is the {t.shape}" if t.n == 1 else f"are the {PLURALS[t.shape]}"
            out += _ask(rng, f"what color {noun}?", t.color, COLORS)
        if sum(x.color == t.color for x in things) == 1:
            if t.shape == "letter":
                out += _ask(rng, f"which letter is {t.color}?", t.letter, LETTERS)
            else:
                noun = f"is the {t.color} object" if t.n == 1 else f"are the {t.color} objects"
                out += _ask(rng, f"what shape {noun}?", t.shape, SHAPES)
        if t.count is not None:
            out += _ask(rng, f"how many {t.describe(plural=True)} are there?", NUMBER_WORDS[t.count],
                        NUMBER_WORDS.values())
    if spec.relation in SPATIAL:
        a, b = things[:2]
        out += _ask(rng, f"where is the {a.describe()} relative to the {b.describe()}?", spec.relation, SPATIAL)
    if spec.background:
        out += _ask(rng, "what color is the background?", spec.background, BACKGROUNDS)
    return out


def _normalise(text: str) -> str:
    words = [w for w in tokenize(text or "") if w.isalnum()]
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def grade(question: Question, answer_text: str) -> float:
    """1.0 if the answer equals the reference up to case, whitespace, punctuation and a leading article."""
    return float(bool(_normalise(answer_text)) and _normalise(answer_text) == _normalise(question.answer))
