"""UniCycle questions from a prompt and the exact grader."""

import random

from model.world import CATEGORIES, Question, detect, grade, parse, questions, render, sample_prompt, sample_scene
from model.world.facts import answer, facts


def test_question_kinds_and_reference_answers():
    qs = questions("a red circle to the left of a blue square on a black background", random.Random(0))
    kinds = {q.kind for q in qs}
    assert kinds == {"yes_no", "multiple_choice", "open"}
    by_text = {q.text: q for q in qs}
    assert by_text["is there a red circle?"].answer == "yes"
    assert by_text["what color is the circle?"].answer == "red"
    assert by_text["what shape is the blue object?"].answer == "square"
    assert by_text["where is the red circle relative to the blue square?"].answer == "left"
    assert by_text["what color is the background?"].answer == "black"
    for q in qs:
        if q.kind == "multiple_choice":
            assert q.answer in q.choices and len(set(q.choices)) == len(q.choices) >= 3
            assert all(c in q.text for c in q.choices)
        else:
            assert q.choices == ()


def test_questions_only_where_the_prompt_decides_the_answer():
    qs = questions("a red circle and a blue circle", random.Random(0))
    assert not any(q.text.startswith("what color is the circle") for q in qs)  # two circles: ambiguous
    counting = questions("two green diamonds", random.Random(0))
    assert any(q.text == "how many green diamonds are there?" and q.answer == "two" for q in counting)
    neg = questions("a red circle and no squares", random.Random(0))
    assert any(q.text == "are there any squares?" and q.answer == "no" for q in neg)
    assert questions("a purplish circle", random.Random(0)) == []
    assert questions("a red letter h", random.Random(0))[-1].answer == "h"


def test_questions_are_seeded_and_true_of_ground_truth():
    rng = random.Random(3)
    for i in range(100):
        text = sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng)
        assert questions(text, random.Random(i)) == questions(text, random.Random(i))
        spec = parse(text).spec
        scene = detect(render(sample_scene(spec, rng)))
        yes_no = [q for q in questions(text, rng) if q.kind == "yes_no"]
        primary = [f for f in facts(spec) if f.primary]
        assert [q.text for q in yes_no] == [f.question for f in primary]
        assert all(answer(f, scene) == q.answer for f, q in zip(primary, yes_no))


def test_grader_is_exact_up_to_case_whitespace_and_articles():
    q = Question("open", "what color is the circle?", "red")
    assert [grade(q, a) for a in ("red", " Red. ", "RED", "the red", "red\n")] == [1.0] * 5
    assert [grade(q, a) for a in ("blue", "", "red circle", "reddish", None, "not red")] == [0.0] * 6
    rel = Question("multiple_choice", "where ...? choices: left, right.", "left", ("left", "right"))
    assert grade(rel, "Left") == 1.0 and grade(rel, "right") == 0.0
