"""The prompt language: vocabulary, samplers, parser (valid and invalid), round trip, size of the language."""

import random

import pytest

from model.world import CATEGORIES, WORDS, parse, prompt_count, questions, sample_prompt, tokenize
from model.world.facts import facts, reasoning_text
from model.world.language import PromptSpec, Thing, sample_spec


@pytest.mark.parametrize("category", CATEGORIES)
def test_sampled_prompts_parse_round_trip_and_keep_their_category(category):
    rng = random.Random(category)
    for _ in range(200):
        text = sample_prompt(category, rng)
        res = parse(text)
        assert res.ok, (text, res.reason)
        assert res.spec.to_text() == text
        assert res.spec.category == category
        assert res.reason is None


def test_every_text_of_the_world_tokenizes_into_words():
    assert len(set(WORDS)) == len(WORDS)
    rng = random.Random(1)
    for i in range(300):
        text = sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng)
        spec = parse(text).spec
        fs = facts(spec)
        texts = [text, reasoning_text(spec, fs, [rng.random() < 0.5 for _ in fs], rng.randrange(11))]
        texts += [q.text + " " + q.answer for q in questions(text, rng)]
        for t in texts:
            missing = [w for w in tokenize(t) if w not in WORDS]
            assert not missing, (t, missing)
    assert tokenize("A Red circle, above?") == ["a", "red", "circle", ",", "above", "?"]


def test_language_is_large_enough_and_the_counts_are_exact():
    assert prompt_count() >= 100_000
    assert prompt_count() == sum(prompt_count(c) for c in CATEGORIES)
    # The formula must equal what the sampler really produces: exhaust the small categories.
    for category in ("single_object", "color_binding", "relative_size"):
        rng = random.Random(category)
        seen = {sample_prompt(category, rng) for _ in range(40 * prompt_count(category))}
        assert len(seen) == prompt_count(category), category


@pytest.mark.parametrize("text, reason", [
    ("", "empty prompt"),
    ("   ", "empty prompt"),
    ("a purplish circle", "unknown word 'purplish'"),
    ("5 red circles", "count 5 out of range"),
    ("2 red circles", "count 2 must be a word"),
    ("two red circles and two blue squares", "too many objects"),
    ("a red circle and no circles", "contradicts"),
    ("a red circle and no red shapes", "contradicts"),
    ("a red circle and a red circle", "named twice"),
    ("a small red letter h", "letters take no size"),
    ("two red circle", "does not agree"),
    ("a red circles", "does not agree"),
    ("a red", "prompt ends where a shape was expected"),
    ("a circle", "expected a colour"),
    ("red circle", "expected 'a' or a number"),
    ("a red circle to the left", "unexpected word 'to'"),
    ("two red circles above a blue square", "a relation needs single objects"),
    ("a large red circle bigger than a blue square", "size relation"),
    ("a red letter q", "unknown word 'q'"),
    ("a red letter x", "unknown word 'x'"),
    ("a red circle on a red background", "expected a background colour"),
    ("a red circle and no letters", "expected a plural shape"),
])
def test_invalid_prompts_give_a_reason(text, reason):
    res = parse(text)
    assert not res.ok and res.spec is None
    assert reason in res.reason, res.reason


def test_non_canonical_spellings_parse_to_the_canonical_text():
    assert parse("  A RED Circle.  ").spec.to_text() == "a red circle"
    assert parse("a orange square").spec.to_text() == "an orange square"
    assert parse("Two Blue Squares and one yellow triangle").spec.category == "counting"
    spec = parse("a red circle to the left of a blue square and a green triangle").spec
    assert spec == PromptSpec((Thing("red", "circle"), Thing("blue", "square"), Thing("green", "triangle")), "left")


def test_parse_never_raises_on_junk():
    rng = random.Random(0)
    for n in range(2000):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(1, 12))]
        res = parse(" ".join(words))
        assert res.ok or isinstance(res.reason, str)
        if res.ok:  # whatever parses is a valid spec that round trips
            assert parse(res.spec.to_text()).spec == res.spec
    for junk in (None, 3, ["a red circle"], "\x00\n", "🙂", "a" * 10_000):
        res = parse(junk)
        assert not res.ok and res.reason


def test_samplers_are_seeded():
    for c in CATEGORIES:
        assert sample_spec(c, random.Random(7)) == sample_spec(c, random.Random(7))
    with pytest.raises(ValueError):
        sample_prompt("portrait", random.Random(0))
