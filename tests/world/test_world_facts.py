"""Facts, the rubric's score bands and caps, and the reasoning text <-> parse round trip."""

import json
import random

import pytest

from model.world import (CATEGORIES, Obj, Rubric, Scene, answer, check_facts, facts, parse, parse_reasoning,
                         reasoning_text, render, sample_prompt, score, verify)


def _spec(text):
    res = parse(text)
    assert res.ok, res.reason
    return res.spec


def test_facts_of_a_complex_prompt():
    fs = facts(_spec("a red circle to the left of a small blue square and a green triangle"))
    assert [(f.kind, f.question, f.expected, f.primary) for f in fs] == [
        ("presence", "is there a red circle?", "yes", True),
        ("presence", "is there a small blue square?", "yes", True),
        ("presence", "is there a green triangle?", "yes", True),
        ("relation", "is the red circle to the left of the small blue square?", "yes", True),
        ("total", "are there exactly three objects?", "yes", False),
    ]
    assert len({f.id for f in fs}) == len(fs)
    neg = facts(_spec("a red circle and no blue shapes"))
    assert (neg[1].kind, neg[1].question, neg[1].expected) == ("absence", "are there any blue shapes?", "no")
    cnt = facts(_spec("one red circle and two blue squares"))
    assert [f.question for f in cnt[:2]] == ["is there exactly one red circle?", "are there exactly two blue squares?"]


def test_answers_follow_the_scene():
    a, b = Obj("circle", "red", "large", 8, 8), Obj("square", "blue", "small", 24, 8)
    spec = _spec("a red circle to the left of a blue square")
    assert check_facts(spec, Scene((a, b))) == [True, True, True, True]
    assert check_facts(spec, Scene((b, a))) == [True, True, True, True]  # order of objects is irrelevant
    moved = Scene((Obj("circle", "red", "large", 24, 8), Obj("square", "blue", "small", 8, 8)))
    assert check_facts(spec, moved) == [True, True, False, True]
    extra = Scene((a, b, Obj("diamond", "green", "small", 8, 24)))
    assert check_facts(spec, extra) == [True, True, True, False]
    assert check_facts(_spec("a red circle bigger than a blue square"), Scene((a, b)))[2]
    assert not check_facts(_spec("a red circle smaller than a blue square"), Scene((a, b)))[2]
    assert answer(facts(_spec("a red circle and no squares"))[1], Scene((a, b))) == "yes"
    assert check_facts(_spec("a red letter h"), Scene((Obj("letter", "red", "large", 8, 8, "t"),))) == [False, True]


def _score(text, scene, rubric=None):
    spec = _spec(text)
    return score(spec, check_facts(spec, scene), rubric)


def test_rubric_bands_and_caps():
    rc, bs, gt = Obj("circle", "red", "large", 8, 8), Obj("square", "blue", "small", 24, 8), \
        Obj("triangle", "green", "small", 8, 24)
    rel = "a red circle to the left of a blue square"
    assert _score(rel, Scene((rc, bs))) == 10
    assert _score(rel, Scene((rc, bs, gt))) == 9  # right, with an extra object
    swapped = Scene((Obj("circle", "red", "large", 24, 8), Obj("square", "blue", "small", 8, 8)))
    assert 4 <= _score(rel, swapped) <= 5  # both objects, wrong relation
    assert 0 <= _score(rel, Scene((rc,))) <= 3  # an object missing
    assert _score(rel, Scene()) == 0
    # a wrong count caps at 2 even when everything else is right
    two = Scene((rc, Obj("circle", "red", "large", 24, 8), bs))
    assert _score("three red circles", two) <= 2
    assert _score("two red circles and one blue square", Scene((rc, bs, gt))) <= 2
    assert _score("two red circles and one blue square", two) == 10
    assert _score("a red circle and no blue shapes", Scene((rc, bs))) <= 3
    assert _score("a red circle on a black background", Scene((rc,), "white")) <= 5
    # every partial answer is a rejection at the default threshold 7
    rng = random.Random(0)
    for i in range(200):
        spec = _spec(sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng))
        fs = facts(spec)
        ok = [rng.random() < 0.7 for _ in fs]
        s = score(spec, ok, None)
        assert 0 <= s <= 10
        assert (s >= 7) == all(o for f, o in zip(fs, ok) if f.primary)


def test_rubric_is_configurable_and_serialisable():
    r = Rubric()
    dumped = r.model_dump()
    assert Rubric(**json.loads(json.dumps(dumped))) == r
    strict = Rubric(caps={**r.caps, "relation": 1}, secondary_penalty=3, max_secondary_penalty=3)
    assert strict.model_dump() != dumped
    swapped = Scene((Obj("circle", "red", "large", 24, 8), Obj("square", "blue", "small", 8, 8)))
    assert _score("a red circle to the left of a blue square", swapped, strict) == 1
    extra = Scene((Obj("circle", "red", "large", 8, 8), Obj("square", "blue", "small", 24, 8)))
    assert _score("a red circle", extra, strict) == 7
    with pytest.raises(ValueError):
        score(_spec("a red circle"), [True])


def test_reasoning_text_round_trips_and_is_parsed_robustly():
    rng = random.Random(0)
    for i in range(100):
        spec = _spec(sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng))
        fs = facts(spec)
        ok = [rng.random() < 0.6 for _ in fs]
        s = score(spec, ok)
        text = reasoning_text(spec, fs, ok, s)
        assert parse_reasoning(text) == (ok, s)
        assert parse_reasoning(text.upper().replace("\n", "  ")) == (ok, s)  # casing / layout do not matter
        assert all(f.question in text for f in fs)
    text = reasoning_text(spec, None, ok, s)  # facts default to the spec's
    assert parse_reasoning(text) == (ok, s)
    assert parse_reasoning("is there a red circle? yes correct. is there a blue square? no , wrong. score:4") == (
        [True, False], 4)
    for junk in ("", "score: 11", "is there a red circle? yes, correct.", None, "score: banana"):
        assert parse_reasoning(junk) is None


def test_verdict_reasoning_matches_its_fields():
    text = "two red circles and one blue square"
    v = verify(text, render(Scene((Obj("circle", "red", "large", 8, 8), Obj("square", "blue", "small", 24, 8)))))
    assert not v.ok and v.score <= 2
    assert parse_reasoning(v.reasoning) == (v.fact_ok, v.score)
    assert "are there exactly two red circles? no, wrong." in v.reasoning
