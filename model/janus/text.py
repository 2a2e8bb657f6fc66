"""Text side of the Janus backend: the prompt formats, a local tokenizer for random weights, and the judge's
JSON parser.

Janus-Pro's conversation format (deepseek's SFT format, as the transformers chat template writes it):

    <bos><|User|>: {content}\n\n<|Assistant|>:{answer}<eos>

Image generation appends <begin_of_image> to the user turn's prompt; understanding puts
<begin_of_image> + 576 x <image_placeholder> + <end_of_image> before the question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SPECIALS = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>",
            "image": "<image_placeholder>", "boi": "<begin_of_image>", "eoi": "<end_of_image>"}

GEN_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
UND_TEMPLATE = "<|User|>: {image}\n{question}\n\n<|Assistant|>:"
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


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    image: int
    boi: int
    eoi: int


def special_ids(tokenizer) -> SpecialIds:
    ids = {}
    for k, tok in SPECIALS.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {tok!r} token (Janus special {k})")
        ids[k] = int(i)
    return SpecialIds(**ids)


def byte_tokenizer():
    """A byte-level tokenizer with Janus's special tokens, built locally (no download): for random weights.

    256 byte tokens, then the specials; every text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
                                   pad_token=SPECIALS["pad"],
                                   additional_special_tokens=[SPECIALS["image"], SPECIALS["boi"], SPECIALS["eoi"]])
    fast.padding_side = "left"
    return fast


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
