"""What every backend says and parses, whatever its chat format: the instructions of the propose, reflect and judge
roles, the judge's default rubric and the caption questions, and the robust parser of the judge's JSON
{"analysis", "score"} (UniCorn's format). A backend wraps these in its own conversation template
(model/janus/text.py, model/bagel/umm.py)."""

from __future__ import annotations

import json
import re

PROPOSE_INSTRUCTION = ("Write one new text-to-image prompt of the category '{category}', in the style of these "
                       "examples, and nothing else.\n{examples}")
REFLECT_INSTRUCTION = "The image above was drawn for the prompt '{prompt}' and has flaws. Draw it again, correctly."
JUDGE_INSTRUCTION = (
    "You judge whether an image shows what its prompt asks for.\nPrompt: {prompt}\nRubric: {rubric}\n"
    "Check each thing the prompt demands, then answer with JSON only: "
    '{{"analysis": "<what you checked>", "score": <integer 0-10>}}')
DEFAULT_RUBRIC = ("primary criteria: every object, count, colour, position and text that the prompt demands is "
                  "shown; secondary: image quality. Bands: 10 all correct; 8-9 a minor flaw; 6-7 one demand "
                  "wrong; 4-5 several wrong; 0-3 unrelated. A wrong count scores at most 2.")
CAPTION_TEMPLATES = ("Which prompt made this image? Answer with the prompt only.",
                     "What text-to-image prompt drew this picture?",
                     "Write the prompt of this image.")


def rubric_text(rubric) -> str:
    """A rubric as one line of text: a string as is, a dict of criteria as JSON, None the default."""
    if rubric is None or rubric == {}:
        return DEFAULT_RUBRIC
    if isinstance(rubric, str):
        return rubric
    if isinstance(rubric, dict):
        return json.dumps(rubric, sort_keys=True)
    return str(rubric)


_SCORE_RE = re.compile(r'"?score"?\s*[:=]\s*"?(-?\d+(?:\.\d+)?)')
_ANALYSIS_RE = re.compile(r'"analysis"\s*:\s*"((?:[^"\\]|\\.)*)"', re.S)


def analysis_only(text: str) -> str:
    """A constrained judge's analysis: what it wrote before the string would close (a quote, an escape, a line)."""
    return re.sub(r'["\\\n].*$', "", text, flags=re.S).strip()


def judgement_of(raw: str):
    """A judge's output as a Judgement: parsed robustly (`parse_judgement`), parse_ok False with no score when it
    does not parse."""
    from model.protocol import Judgement

    reasoning, score = parse_judgement(raw)
    return Judgement(reasoning=reasoning, score=score, raw=raw, parse_ok=score is not None)


def parse_judgement(raw: str) -> tuple[str, int | None]:
    """(reasoning, score 0-10 or None) from a judge's output, robustly.

    Tries, in order: the last JSON object in the text with a 'score'; a `score: n` pattern anywhere. A score
    outside 0-10 or not a whole number counts as unparsed. The reasoning is the JSON's 'analysis' when there is
    one, else the text before the score.
    """
    text = raw or ""
    # 1. JSON objects, last first (models often think aloud, then answer)
    starts = [m.start() for m in re.finditer(r"\{", text)]
    for s in reversed(starts):
        depth, end = 0, None
        in_str, esc = False, False
        for j in range(s, len(text)):
            c = text[j]
            if in_str:
                esc = (c == "\\") and not esc
                if c == '"' and not esc:
                    in_str = False
                continue
            if c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = j + 1
                    break
        if end is None:
            continue
        try:
            obj = json.loads(text[s:end])
        except ValueError:
            continue
        if isinstance(obj, dict) and "score" in obj:
            score = _as_score(obj["score"])
            if score is None:
                return str(obj.get("analysis", "")), None
            analysis = obj.get("analysis", obj.get("reasoning", text[:s]))
            return (analysis if isinstance(analysis, str) else json.dumps(analysis)).strip(), score
    # 2. a loose `score: n`
    m = None
    for m in _SCORE_RE.finditer(text):
        pass
    if m is not None:
        score = _as_score(m.group(1))
        am = _ANALYSIS_RE.search(text)
        reasoning = am.group(1) if am else text[:m.start()]
        return reasoning.strip().strip('{",').strip(), score
    return text.strip(), None


def _as_score(v) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if f != int(f) or not 0 <= f <= 10:
        return None
    return int(f)
