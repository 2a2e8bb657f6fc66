"""GenEval-style real-model benchmark suite: compositional text-to-image prompts with questions for an external VLM.

This suite is independent of the project's synthetic ShapeWorld. It covers GenEval's six categories (single_object,
two_object, counting, colors, position, color_attr) with GenEval's prompt templates, but it is *not* the official
GenEval prompt file (which cannot be downloaded here): it is generated deterministically from GenEval's own
vocabulary -- the 80 COCO object classes as GenEval names them (with their singular and plural forms), GenEval's ten
colours, its counts 2-4 and its four relations (left of, right of, above, below). Scores on it are therefore
"GenEval-style", not comparable number for number with published GenEval results.

Each prompt carries questions with reference answers that a VLM answers from the generated image; the reference
answers are mixed (yes and no, counts, colours) so that a VLM that always says "yes" does not score full marks.

Sampling: every category's prompt space is enumerated (up to symmetry: "a dog and a cat" and "a cat and a dog" are
one prompt, as are "a dog left of a cat" and "a cat right of a dog") and a prefix of a random permutation of it is
drawn lazily (sparse Fisher-Yates), with one ``random.Random`` per category seeded from ``(SUITE, seed, category)``
through SHA-256. Prompts are thus distinct within a category, deterministic for ``(per_category, seed)``, and a
smaller suite is a prefix of each category of a larger one with the same seed.

Pure standard library; imports nothing from the rest of the repository.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SUITE = "geneval-style-v1"
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# The 80 COCO classes as GenEval names them (its object_names.txt), as (singular, plural). GenEval keeps "skis" and
# "scissors" as they are in both forms ("a photo of a skis"); so does this suite.
OBJECTS: tuple[tuple[str, str], ...] = (
    ("person", "people"), ("bicycle", "bicycles"), ("car", "cars"), ("motorcycle", "motorcycles"),
    ("airplane", "airplanes"), ("bus", "buses"), ("train", "trains"), ("truck", "trucks"), ("boat", "boats"),
    ("traffic light", "traffic lights"), ("fire hydrant", "fire hydrants"), ("stop sign", "stop signs"),
    ("parking meter", "parking meters"), ("bench", "benches"), ("bird", "birds"), ("cat", "cats"), ("dog", "dogs"),
    ("horse", "horses"), ("sheep", "sheep"), ("cow", "cows"), ("elephant", "elephants"), ("bear", "bears"),
    ("zebra", "zebras"), ("giraffe", "giraffes"), ("backpack", "backpacks"), ("umbrella", "umbrellas"),
    ("handbag", "handbags"), ("tie", "ties"), ("suitcase", "suitcases"), ("frisbee", "frisbees"), ("skis", "skis"),
    ("snowboard", "snowboards"), ("sports ball", "sports balls"), ("kite", "kites"), ("baseball bat", "baseball bats"),
    ("baseball glove", "baseball gloves"), ("skateboard", "skateboards"), ("surfboard", "surfboards"),
    ("tennis racket", "tennis rackets"), ("bottle", "bottles"), ("wine glass", "wine glasses"), ("cup", "cups"),
    ("fork", "forks"), ("knife", "knives"), ("spoon", "spoons"), ("bowl", "bowls"), ("banana", "bananas"),
    ("apple", "apples"), ("sandwich", "sandwiches"), ("orange", "oranges"), ("broccoli", "broccoli"),
    ("carrot", "carrots"), ("hot dog", "hot dogs"), ("pizza", "pizzas"), ("donut", "donuts"), ("cake", "cakes"),
    ("chair", "chairs"), ("couch", "couches"), ("potted plant", "potted plants"), ("bed", "beds"),
    ("dining table", "dining tables"), ("toilet", "toilets"), ("tv", "tvs"), ("laptop", "laptops"),
    ("computer mouse", "computer mice"), ("tv remote", "tv remotes"), ("computer keyboard", "computer keyboards"),
    ("cell phone", "cell phones"), ("microwave", "microwaves"), ("oven", "ovens"), ("toaster", "toasters"),
    ("sink", "sinks"), ("refrigerator", "refrigerators"), ("book", "books"), ("clock", "clocks"), ("vase", "vases"),
    ("scissors", "scissors"), ("teddy bear", "teddy bears"), ("hair drier", "hair driers"),
    ("toothbrush", "toothbrushes"),
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COUNTS = (2, 3, 4)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

YES_NO = ("yes", "no")
COUNT_CHOICES = tuple(str(i) for i in range(7))

_N_OBJ = len(OBJECTS)
_N_PAIRS = _N_OBJ * (_N_OBJ - 1) // 2                        # unordered pairs of different objects
_N_COLOR_PAIRS = len(COLORS) * (len(COLORS) - 1)             # ordered pairs of different colours


@dataclass(frozen=True)
class Question:
    text: str                   # e.g. "Is there a dog in the image?"
    choices: tuple[str, ...]    # the answers the VLM may give, e.g. ("yes", "no") or ("0", "1", ..., "6")
    answer: str                 # the reference answer, one of choices


@dataclass(frozen=True)
class SuitePrompt:
    category: str
    prompt: str
    questions: tuple[Question, ...]


def article(word: str) -> str:
    """'an' before a vowel, else 'a' (by spelling; GenEval's vocabulary has no exceptions)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{article(word)} {word}"


# How many distinct prompts (up to the symmetries described in the module docstring) each category can offer.
CAPACITY: dict[str, int] = {
    "single_object": _N_OBJ,
    "two_object": _N_PAIRS,
    "counting": _N_OBJ * len(COUNTS),
    "colors": _N_OBJ * len(COLORS),
    "position": _N_PAIRS * len(RELATIONS),
    "color_attr": _N_PAIRS * _N_COLOR_PAIRS,
}

_PAIRS: list[tuple[int, int]] = [(i, j) for i in range(_N_OBJ) for j in range(i + 1, _N_OBJ)]


def _category_rng(seed: int, category: str) -> random.Random:
    digest = hashlib.sha256(f"{SUITE}\x00{seed}\x00{category}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _permutation_prefix(rng: random.Random, size: int, k: int):
    """The first k items of a uniform random permutation of range(size), drawn lazily (sparse Fisher-Yates).

    The i-th item depends only on the rng's state, never on k, so shorter prefixes agree with longer ones provided
    the caller draws the same further numbers from rng between items.
    """
    swapped: dict[int, int] = {}
    for i in range(k):
        j = rng.randrange(i, size)
        value = swapped.get(j, j)
        swapped[j] = swapped.get(i, i)
        yield value


def _presence(obj: str, present: bool = True) -> Question:
    return Question(f"Is there {_a(obj)} in the image?", YES_NO, "yes" if present else "no")


def _colour(obj: str, color: str) -> Question:
    return Question(f"What colour is the {obj}?", COLORS, color)


def _make(category: str, index: int, rng: random.Random) -> SuitePrompt:
    """The prompt for one index of the category's space; may draw from rng (a fixed number of draws per category)."""
    if category == "single_object":
        obj = OBJECTS[index][0]
        other = OBJECTS[(index + 1 + rng.randrange(_N_OBJ - 1)) % _N_OBJ][0]   # any object but obj
        return SuitePrompt(category, f"a photo of {_a(obj)}", (_presence(obj), _presence(other, present=False)))
    if category == "two_object":
        i, j = _PAIRS[index]
        if rng.random() < 0.5:
            i, j = j, i
        a, b = OBJECTS[i][0], OBJECTS[j][0]
        return SuitePrompt(category, f"a photo of {_a(a)} and {_a(b)}", (_presence(a), _presence(b)))
    if category == "counting":
        o, c = divmod(index, len(COUNTS))
        n, plural = COUNTS[c], OBJECTS[o][1]
        q = Question(f"How many {plural} are in the image?", COUNT_CHOICES, str(n))
        return SuitePrompt(category, f"a photo of {NUMBER_WORDS[n]} {plural}", (q,))
    if category == "colors":
        o, c = divmod(index, len(COLORS))
        obj, color = OBJECTS[o][0], COLORS[c]
        return SuitePrompt(category, f"a photo of {_a(color)} {obj}", (_presence(obj), _colour(obj, color)))
    if category == "position":
        p, r = divmod(index, len(RELATIONS))
        i, j = _PAIRS[p]
        relation = RELATIONS[r]
        if rng.random() < 0.5:                    # "b rel' a" is the same scene as "a rel b"
            i, j, relation = j, i, OPPOSITE[relation]
        a, b = OBJECTS[i][0], OBJECTS[j][0]
        return SuitePrompt(category, f"a photo of {_a(a)} {relation} {_a(b)}", (
            _presence(a), _presence(b),
            Question(f"Is the {a} {relation} the {b}?", YES_NO, "yes"),
            Question(f"Is the {a} {OPPOSITE[relation]} the {b}?", YES_NO, "no"),
        ))
    if category == "color_attr":
        p, cp = divmod(index, _N_COLOR_PAIRS)
        i, j = _PAIRS[p]
        c1, rest = divmod(cp, len(COLORS) - 1)
        c2 = rest + (rest >= c1)                  # any colour but c1
        if rng.random() < 0.5:
            i, j, c1, c2 = j, i, c2, c1
        a, b = OBJECTS[i][0], OBJECTS[j][0]
        col1, col2 = COLORS[c1], COLORS[c2]
        return SuitePrompt(category, f"a photo of {_a(col1)} {a} and {_a(col2)} {b}",
                           (_colour(a, col1), _colour(b, col2)))
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def suite_prompts(per_category: int, seed: int) -> list[SuitePrompt]:
    """per_category distinct prompts for each category in CATEGORIES order, deterministic for (per_category, seed).

    A smaller suite's prompts of each category are a prefix of that category's prompts in a larger one (same seed).
    """
    if isinstance(per_category, bool) or not isinstance(per_category, int):
        raise ValueError(f"per_category must be an int, got {per_category!r}")
    most = min(CAPACITY.values())
    if not 1 <= per_category <= most:
        smallest = min(CAPACITY, key=CAPACITY.__getitem__)
        raise ValueError(f"per_category must be between 1 and {most} (category {smallest!r} offers only {most} "
                         f"distinct prompts), got {per_category}")
    out: list[SuitePrompt] = []
    for category in CATEGORIES:
        rng = _category_rng(seed, category)
        for index in _permutation_prefix(rng, CAPACITY[category], per_category):
            out.append(_make(category, index, rng))
    return out


def question_schema(q: Question) -> dict:
    """A JSON schema that constrains a VLM's reply to one of the question's choices."""
    return {
        "type": "object",
        "properties": {"answer": {"enum": list(q.choices)}},
        "required": ["answer"],
        "additionalProperties": False,
    }


def grade(q: Question, said: str | None) -> float:
    """1.0 if the answer said (stripped, lowercased) is the reference answer, else 0.0 (no answer scores 0.0)."""
    if said is None:
        return 0.0
    return 1.0 if said.strip().lower() == q.answer else 0.0
