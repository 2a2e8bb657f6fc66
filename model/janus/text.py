"""Text side of the Janus backend: its conversation format and special tokens, and a local tokenizer for random
weights. The role instructions and the judge's JSON parser, shared by every backend, are model/prompts.py.

Janus-Pro's conversation format (deepseek's SFT format, as the transformers chat template writes it):

    <bos><|User|>: {content}\n\n<|Assistant|>:{answer}<eos>

Image generation appends <begin_of_image> to the user turn's prompt; understanding puts
<begin_of_image> + 576 x <image_placeholder> + <end_of_image> before the question.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.prompts import (  # noqa: F401 - the shared prompts and parser, as the Janus backend uses them
    CAPTION_TEMPLATES,
    DEFAULT_RUBRIC,
    JUDGE_INSTRUCTION,
    PROPOSE_INSTRUCTION,
    REFLECT_INSTRUCTION,
    analysis_only,
    judgement_of,
    parse_judgement,
    rubric_text,
)

SPECIALS = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>",
            "image": "<image_placeholder>", "boi": "<begin_of_image>", "eoi": "<end_of_image>"}

GEN_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
UND_TEMPLATE = "<|User|>: {image}\n{question}\n\n<|Assistant|>:"


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
