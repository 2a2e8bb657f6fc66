"""ShapeWorld: the embedded model's synthetic compositional world and its exact oracle.

Read in this order: vocab (constants, WORDS) -> scene (Obj, Scene, render) -> language (PromptSpec, parse, samplers)
-> facts (Fact, Rubric, score, reasoning) -> oracle (detect, verify) -> questions (UniCycle) -> check.
"""

from .check import world_check
from .facts import Fact, Rubric, answer, check_facts, facts, parse_reasoning, reasoning_text, score
from .language import (ParseResult, PromptSpec, Thing, parse, perturb, prompt_count, random_scene, sample_prompt,
                       sample_scene, sample_spec)
from .oracle import Verdict, classify_pixels, detect, verify
from .questions import Question, grade, questions
from .scene import Obj, Scene, render
from .vocab import (BACKGROUND_RGB, BACKGROUNDS, CATEGORIES, COLOR_RGB, COLORS, LETTERS, RELATIONS, SHAPES, SIZES,
                    WORDS, tokenize)

__all__ = [
    "BACKGROUNDS", "BACKGROUND_RGB", "CATEGORIES", "COLORS", "COLOR_RGB", "LETTERS", "RELATIONS", "SHAPES", "SIZES",
    "WORDS", "tokenize",
    "Obj", "Scene", "render", "Thing", "PromptSpec", "ParseResult", "parse", "sample_prompt", "sample_spec",
    "sample_scene", "random_scene", "perturb", "prompt_count", "Fact", "Rubric", "facts", "answer", "check_facts",
    "score", "reasoning_text", "parse_reasoning", "Verdict", "detect", "verify", "classify_pixels", "Question",
    "questions", "grade", "world_check",
]
