"""Token sequence layouts of every task the one transformer learns, and batch collation.

Each builder returns (ids, targets): `targets[t]` is True where token t is predicted (trained on).

    generation  <gen> prompt <img> c1..c64                       loss on the codes
    question    <und> c1..c64 (<q> question <a> answer <eos>)*n  loss on answers and <eos>
    caption     question layout, question = a caption instruction, answer = the prompt
    propose     <prop> <cat:x> (<ex> prompt)* <new> prompt <eos> loss on the new prompt and <eos>
    reflection  <ref> prompt <img> flawed c1..c64 <img2> c1..c64 loss on the corrected codes

Kinds are numbered (KIND_IDS) so a batch can weight its losses per kind.
"""

from __future__ import annotations

import numpy as np
import torch

from model.embedded.tokenizer import Vocab

KINDS = ("generation", "question", "caption", "propose", "reflection")
KIND_IDS = {k: i for i, k in enumerate(KINDS)}

CAPTION_TEMPLATES = (
    "which prompt made this image",
    "what prompt drew this picture",
    "describe this image",
    "write the prompt of this image",
)


def codes_ids(v: Vocab, codes) -> list[int]:
    return [v.img_offset + int(c) for c in codes]


def gen_prefix(v: Vocab, prompt_ids: list[int] | None) -> list[int]:
    return [v.GEN] + (prompt_ids or []) + [v.IMG]


def generation_seq(v: Vocab, prompt_ids: list[int] | None, codes) -> tuple[list[int], list[bool]]:
    pre = gen_prefix(v, prompt_ids)
    c = codes_ids(v, codes)
    return pre + c, [False] * len(pre) + [True] * len(c)


def und_prefix(v: Vocab, codes) -> list[int]:
    return [v.UND] + codes_ids(v, codes)


def question_block(v: Vocab, q_ids: list[int]) -> list[int]:
    return [v.Q] + q_ids + [v.A]


def question_seq(v: Vocab, codes, qa: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[bool]]:
    ids = und_prefix(v, codes)
    tg = [False] * len(ids)
    for q, a in qa:
        blk = question_block(v, q)
        ids += blk + a + [v.EOS]
        tg += [False] * len(blk) + [True] * (len(a) + 1)
    return ids, tg


def propose_prefix(v: Vocab, category: str, examples: list[list[int]]) -> list[int]:
    ids = [v.PROP, v.cat(category)]
    for e in examples:
        ids += [v.EX] + e
    return ids + [v.NEW]


def propose_seq(v: Vocab, category: str, examples: list[list[int]], target: list[int]):
    pre = propose_prefix(v, category, examples)
    return pre + target + [v.EOS], [False] * len(pre) + [True] * (len(target) + 1)


def reflect_prefix(v: Vocab, prompt_ids: list[int] | None, flawed_codes) -> list[int]:
    return [v.REF] + (prompt_ids or []) + [v.IMG] + codes_ids(v, flawed_codes) + [v.IMG2]


def reflection_seq(v: Vocab, prompt_ids, flawed_codes, target_codes):
    pre = reflect_prefix(v, prompt_ids, flawed_codes)
    c = codes_ids(v, target_codes)
    return pre + c, [False] * len(pre) + [True] * len(c)


def collate(seqs: list[tuple[list[int], list[bool]]], pad: int, max_len: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (ids (B, T) long, targets (B, T) bool)."""
    T = max(len(s[0]) for s in seqs)
    if max_len is not None and T > max_len:
        raise ValueError(f"sequence of {T} tokens is longer than the model's max_len {max_len}")
    ids = np.full((len(seqs), T), pad, dtype=np.int64)
    tg = np.zeros((len(seqs), T), dtype=bool)
    for i, (s, t) in enumerate(seqs):
        ids[i, :len(s)] = s
        tg[i, :len(t)] = t
    return torch.from_numpy(ids), torch.from_numpy(tg)
