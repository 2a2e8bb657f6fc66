"""The GenEval-style real-model suite: determinism, prefixes, distinctness, templates, questions, schema, grading."""
import random
import re
from collections import Counter

import pytest

from model.vlm import geneval
from model.vlm.geneval import (CATEGORIES, COLORS, OBJECTS, OPPOSITE, RELATIONS, Question, grade, question_schema,
                               suite_prompts)

SINGULAR = {s for s, _ in OBJECTS}
PLURAL_OF = dict(OBJECTS)
OBJ_RE = "|".join(sorted((re.escape(s) for s in SINGULAR), key=len, reverse=True))
ART = r"(?:a|an)"


def by_category(prompts):
    out = {c: [] for c in CATEGORIES}
    for p in prompts:
        out[p.category].append(p)
    return out


@pytest.fixture(scope="module")
def big():
    return suite_prompts(80, seed=7)


def test_vocabulary():
    assert geneval.SUITE == "geneval-style-v1"
    assert CATEGORIES == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert len(OBJECTS) == 80 and len(SINGULAR) == 80
    assert len(set(PLURAL_OF.values())) == 80
    for s, p in [("person", "people"), ("bus", "buses"), ("sheep", "sheep"), ("skis", "skis"), ("knife", "knives"),
                 ("computer mouse", "computer mice"), ("wine glass", "wine glasses")]:
        assert PLURAL_OF[s] == p
    assert len(COLORS) == 10 and set(OPPOSITE) == set(RELATIONS)
    assert all(OPPOSITE[OPPOSITE[r]] == r and OPPOSITE[r] != r for r in RELATIONS)


def test_determinism_and_seed_matters():
    assert suite_prompts(10, seed=3) == suite_prompts(10, seed=3)
    assert suite_prompts(10, seed=3) != suite_prompts(10, seed=4)


def test_prefix_property(big):
    small = by_category(suite_prompts(5, seed=7))
    mid = by_category(suite_prompts(33, seed=7))
    large = by_category(big)
    for c in CATEGORIES:
        assert small[c] == large[c][:5]
        assert mid[c] == large[c][:33]


def test_category_counts_and_order():
    prompts = suite_prompts(12, seed=1)
    assert Counter(p.category for p in prompts) == {c: 12 for c in CATEGORIES}
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(12)]


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_distinct_prompts(seed):
    prompts = suite_prompts(80, seed=seed)
    assert len({p.prompt for p in prompts}) == len(prompts)
    # single_object at full size is every object exactly once
    singles = [p.prompt for p in prompts if p.category == "single_object"]
    assert {re.sub(rf"^a photo of {ART} ", "", s) for s in singles} == SINGULAR


def test_no_mirrored_duplicates():
    cats = by_category(suite_prompts(80, seed=11))
    pairs = [frozenset(re.fullmatch(rf"a photo of {ART} ({OBJ_RE}) and {ART} ({OBJ_RE})", p.prompt).groups())
             for p in cats["two_object"]]
    assert len(set(pairs)) == len(pairs)


def test_reference_answers_in_choices(big):
    for p in big:
        assert p.questions
        for q in p.questions:
            assert q.answer in q.choices
            assert len(set(q.choices)) == len(q.choices)


def test_templates_and_questions(big):
    cats = by_category(big)
    for p in cats["single_object"]:
        m = re.fullmatch(rf"a photo of {ART} ({OBJ_RE})", p.prompt)
        assert m
        obj = m.group(1)
        (q1, q2) = p.questions
        assert q1.text.endswith(f" {obj} in the image?") and q1.answer == "yes"
        other = re.fullmatch(rf"Is there {ART} ({OBJ_RE}) in the image\?", q2.text).group(1)
        assert other != obj and q2.answer == "no"
    for p in cats["two_object"]:
        a, b = re.fullmatch(rf"a photo of {ART} ({OBJ_RE}) and {ART} ({OBJ_RE})", p.prompt).groups()
        assert a != b
        assert [q.answer for q in p.questions] == ["yes", "yes"]
        assert [q.text for q in p.questions] == [f"Is there {geneval.article(x)} {x} in the image?" for x in (a, b)]
    for p in cats["colors"]:
        color, obj = re.fullmatch(rf"a photo of {ART} (\w+) ({OBJ_RE})", p.prompt).groups()
        assert color in COLORS
        pres, col = p.questions
        assert pres.answer == "yes"
        assert col.text == f"What colour is the {obj}?" and col.choices == COLORS and col.answer == color
    for p in cats["color_attr"]:
        c1, a, c2, b = re.fullmatch(rf"a photo of {ART} (\w+) ({OBJ_RE}) and {ART} (\w+) ({OBJ_RE})",
                                    p.prompt).groups()
        assert a != b and c1 != c2 and {c1, c2} <= set(COLORS)
        assert [(q.text, q.answer) for q in p.questions] == [(f"What colour is the {a}?", c1),
                                                              (f"What colour is the {b}?", c2)]


def test_counting_uses_plurals(big):
    words = {"two": 2, "three": 3, "four": 4}
    seen_n = set()
    for p in by_category(big)["counting"]:
        word, plural = re.fullmatch(r"a photo of (two|three|four) (.+)", p.prompt).groups()
        assert plural in PLURAL_OF.values()
        (q,) = p.questions
        assert q.text == f"How many {plural} are in the image?"
        assert q.choices == tuple(str(i) for i in range(7))
        assert q.answer == str(words[word])
        seen_n.add(words[word])
    assert seen_n == {2, 3, 4}
    full = [p.prompt for p in suite_prompts(80, seed=5) if p.category == "counting"]
    assert len(full) == 80
    # irregular plurals appear verbatim somewhere in the counting space
    all_counting = {geneval._make("counting", i, None).prompt for i in range(geneval.CAPACITY["counting"])}
    assert {"a photo of two people", "a photo of three buses", "a photo of four sheep",
            "a photo of two computer mice"} <= all_counting
    assert not any(re.search(r"\b(persons|sheeps|skiss|buss|bus)$", s) for s in all_counting)


def test_position_questions(big):
    for p in by_category(big)["position"]:
        rel_re = "|".join(RELATIONS)
        a, rel, b = re.fullmatch(rf"a photo of {ART} ({OBJ_RE}) ({rel_re}) {ART} ({OBJ_RE})", p.prompt).groups()
        assert a != b
        qs = {q.text: q.answer for q in p.questions}
        assert qs[f"Is there {geneval.article(a)} {a} in the image?"] == "yes"
        assert qs[f"Is there {geneval.article(b)} {b} in the image?"] == "yes"
        assert qs[f"Is the {a} {rel} the {b}?"] == "yes"
        assert qs[f"Is the {a} {OPPOSITE[rel]} the {b}?"] == "no"
        assert len(qs) == 4


def test_always_yes_does_not_score_full(big):
    qs = [q for p in big for q in p.questions]
    yes_score = sum(grade(q, "yes") for q in qs) / len(qs)
    assert yes_score < 0.75
    for c in ("single_object", "position"):
        cq = [q for p in big if p.category == c for q in p.questions]
        assert sum(grade(q, "yes") for q in cq) < len(cq)


def test_an_before_vowels():
    prompts = [p.prompt for p in suite_prompts(80, seed=2)]
    texts = prompts + [q.text for p in suite_prompts(80, seed=2) for q in p.questions]
    for t in texts:
        for art, word in re.findall(r"\b(a|an) (\w+)", t):
            if t.startswith("a photo") and word == "photo":
                continue
            assert art == ("an" if word[0] in "aeiou" else "a"), (t, art, word)
    assert "a photo of an orange" in {geneval._make("single_object", i, random.Random(0)).prompt for i in range(80)}
    # "an" after a vowel-initial colour, "a" before a consonant object
    all_colors = {geneval._make("colors", i, None).prompt for i in range(geneval.CAPACITY["colors"])}
    assert "a photo of an orange dog" in all_colors and "a photo of a red apple" in all_colors
    assert "a photo of an umbrella" in {f"a photo of {geneval.article(s)} {s}" for s in SINGULAR}


@pytest.mark.parametrize("bad", [0, -1, 81, 10_000])
def test_size_out_of_range(bad):
    with pytest.raises(ValueError, match="per_category"):
        suite_prompts(bad, seed=0)


def test_capacity_is_the_largest_allowed():
    assert min(geneval.CAPACITY.values()) == 80
    assert geneval.CAPACITY["color_attr"] == 3160 * 90 and geneval.CAPACITY["position"] == 3160 * 4


def test_schema():
    for p in suite_prompts(3, seed=0):
        for q in p.questions:
            s = question_schema(q)
            assert s == {"type": "object", "properties": {"answer": {"enum": list(q.choices)}},
                         "required": ["answer"], "additionalProperties": False}


def test_grade():
    q = Question("Is there a dog in the image?", ("yes", "no"), "yes")
    assert grade(q, "yes") == 1.0
    assert grade(q, "  YES \n") == 1.0
    assert grade(q, "no") == 0.0
    assert grade(q, "") == 0.0
    assert grade(q, None) == 0.0
    n = Question("How many dogs are in the image?", tuple(str(i) for i in range(7)), "3")
    assert grade(n, " 3") == 1.0 and grade(n, "three") == 0.0
