"""Pretraining corpus from the world's ground truth (the base model's only pretraining data).

Sequences of every kind (see sequences.py): text -> image; yes/no fact questions on true images, on
minimally wrong images (one attribute of the true scene changed) and on scenes of 0-3 random objects,
with answers from the exact oracle; UniCycle questions on true images; captions; proposals; and
reflection pairs (prompt + wrong image -> true image). Built in worker processes as fixed arrays.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from dataclasses import replace

import numpy as np

from configs.loader import Strict
from model.embedded import sequences as S
from model.embedded.tokenizer import PatchCodebook, Vocab, image_to_array


class DataMix(Strict):
    """Shares of sequence kinds in the pretraining corpus."""

    generation: float = 0.34
    question: float = 0.40
    caption: float = 0.10
    propose: float = 0.06
    reflection: float = 0.10
    qa_per_seq: int = 4
    true_image_share: float = 0.45  # question sequences: image of the prompt itself
    wrong_image_share: float = 0.40  # ... one attribute of the prompt's scene changed
    # the rest: a scene of 0-3 random objects
    unicycle_share: float = 0.15  # questions from world.questions on true images (else fact questions)
    cfg_dropout: float = 0.1  # generation/reflection sequences without their prompt (for CFG)
    category_weights: dict[str, float] | None = None


def _jit(rng: random.Random, shape: str, size: str) -> int:
    from model.world.vocab import JITTER
    j = JITTER if isinstance(JITTER, int) else JITTER.get("letter" if shape == "letter" else size, 1)
    return rng.randint(-j, j)


def distractor_scene(rng: random.Random, max_objects: int = 3):
    """0-max_objects random objects (shapes or letters) in distinct cells, on a random background."""
    from model.world import Thing, sample_scene
    from model.world.language import PromptSpec
    from model.world.vocab import BACKGROUNDS, COLORS, LETTERS, SHAPES, SIZES
    n = rng.randint(0, max_objects)
    things = []
    for _ in range(n):
        color = rng.choice(list(COLORS))
        if rng.random() < 0.15:
            things.append(Thing(color, "letter", None, rng.choice(LETTERS)))
        else:
            things.append(Thing(color, rng.choice(SHAPES), rng.choice(SIZES)))
    bg = rng.choice(list(BACKGROUNDS))
    if not things:
        from model.world import Scene
        return Scene((), bg)
    return sample_scene(PromptSpec(tuple(things), background=bg), rng)


def mutate_scene(scene, rng: random.Random):
    """A minimally wrong scene: one change (colour, shape, size, letter, position, object added or removed,
    background)."""
    from model.world.scene import Scene
    from model.world.vocab import BACKGROUNDS, CELL_CENTERS, COLORS, LETTERS, SHAPES
    objs = list(scene.objects)
    ops = ["color", "shape", "size", "move", "add", "remove", "background", "swap"]
    for _ in range(10):
        op = rng.choice(ops)
        if op in ("color", "shape", "size", "move", "remove") and not objs:
            continue
        if op == "swap" and len(objs) < 2:
            continue
        if op == "add" and len(objs) >= 4:
            continue
        new = list(objs)
        if op == "color":
            i = rng.randrange(len(new))
            new[i] = replace(new[i], color=rng.choice([c for c in COLORS if c != new[i].color]))
        elif op == "shape":
            i = rng.randrange(len(new))
            o = new[i]
            if o.shape == "letter":
                new[i] = replace(o, letter=rng.choice([l for l in LETTERS if l != o.letter]))
            else:
                new[i] = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        elif op == "size":
            i = rng.randrange(len(new))
            o = new[i]
            if o.shape == "letter":
                continue
            new[i] = replace(o, size="small" if o.size == "large" else "large")
        elif op == "move":
            i = rng.randrange(len(new))
            used = {(round(o.cx / 16), round(o.cy / 16)) for o in new}
            free = [(x, y) for x in CELL_CENTERS for y in CELL_CENTERS if (round(x / 16), round(y / 16)) not in used]
            if not free:
                continue
            x, y = rng.choice(free)
            o = new[i]
            new[i] = replace(o, cx=x + _jit(rng, o.shape, o.size), cy=y + _jit(rng, o.shape, o.size))
        elif op == "swap":
            i, j = rng.sample(range(len(new)), 2)
            a, b = new[i], new[j]
            new[i], new[j] = replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)
        elif op == "remove":
            new.pop(rng.randrange(len(new)))
        elif op == "add":
            extra = distractor_scene(rng, 3).objects
            used = {(round(o.cx / 16), round(o.cy / 16)) for o in new}
            extra = [o for o in extra if (round(o.cx / 16), round(o.cy / 16)) not in used]
            if not extra:
                continue
            new.append(extra[0])
        elif op == "background":
            return Scene(tuple(new), rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        return Scene(tuple(new), scene.background)
    return distractor_scene(rng)


class CorpusBuilder:
    """Makes pretraining sequences; `build(n, seed)` returns fixed arrays (ids int16, targets bool, kinds)."""

    def __init__(self, vocab: Vocab, codebook: PatchCodebook, mix: DataMix, max_len: int):
        self.v = vocab
        self.cb = codebook
        self.mix = mix
        self.max_len = max_len
        from model.world import CATEGORIES
        self.categories = list(CATEGORIES)
        w = mix.category_weights or {}
        self.cat_w = [float(w.get(c, 1.0)) for c in self.categories]

    def ids(self, text: str) -> list[int]:
        from model.world import tokenize
        return self.v.text_ids(tokenize(text))

    def _prompt(self, rng: random.Random):
        from model.world import sample_prompt
        cat = rng.choices(self.categories, self.cat_w)[0]
        return cat, sample_prompt(cat, rng)

    def _prompt_text(self, p) -> str:
        return p if isinstance(p, str) else p.text

    def _true_image(self, spec, rng):
        from model.world import render, sample_scene
        scene = sample_scene(spec, rng)
        return scene, render(scene)

    def _spec(self, text):
        from model.world import parse
        r = parse(text)
        if not r.ok:
            raise RuntimeError(f"world sample_prompt gave an unparseable prompt {text!r}: {r.reason}")
        return r.spec

    def _codes(self, img) -> np.ndarray:
        return self.cb.encode_arrays(image_to_array(img)[None])[0]

    def one(self, rng: random.Random) -> tuple[list[int], list[bool], int]:
        """One sequence of a kind drawn from the mix: (ids, targets, kind id)."""
        from model.world import render
        m = self.mix
        kinds = ["generation", "question", "caption", "propose", "reflection"]
        kind = rng.choices(kinds, [m.generation, m.question, m.caption, m.propose, m.reflection])[0]
        cat, p = self._prompt(rng)
        text = self._prompt_text(p)
        spec = self._spec(text)
        if kind == "generation":
            _, img = self._true_image(spec, rng)
            pid = None if rng.random() < m.cfg_dropout else self.ids(text)
            s = S.generation_seq(self.v, pid, self._codes(img))
        elif kind == "caption":
            _, img = self._true_image(spec, rng)
            q = self.ids(rng.choice(S.CAPTION_TEMPLATES))
            s = S.question_seq(self.v, self._codes(img), [(q, self.ids(text))])
        elif kind == "propose":
            k = rng.randint(1, 3)
            ex = [self.ids(self._prompt_text(__import__("model.world", fromlist=["x"]).sample_prompt(cat, rng)))
                  for _ in range(k)]
            s = S.propose_seq(self.v, cat, ex, self.ids(text))
        elif kind == "reflection":
            scene, img = self._true_image(spec, rng)
            bad = render(mutate_scene(scene, rng))
            pid = None if rng.random() < m.cfg_dropout else self.ids(text)
            s = S.reflection_seq(self.v, pid, self._codes(bad), self._codes(img))
        else:
            s = self._question_one(text, spec, rng)
            kind = "question"
        return s[0], s[1], S.KIND_IDS[kind]

    def _question_image(self, spec, rng: random.Random):
        """(image, truth) for a question sequence: the prompt's true image, a wrong one, or a random scene."""
        from model.world import render
        m = self.mix
        u = rng.random()
        if u < m.true_image_share:
            _, img = self._true_image(spec, rng)
            truth = "true"
        elif u < m.true_image_share + m.wrong_image_share:
            if rng.random() < 0.5:
                from model.world import perturb
                _, img = self._true_image(perturb(spec, rng), rng)
            else:
                scene, _ = self._true_image(spec, rng)
                img = render(mutate_scene(scene, rng))
            truth = "wrong"
        else:
            img = render(distractor_scene(rng))
            truth = "random"
        return img, truth

    def _question_one(self, text: str, spec, rng: random.Random) -> tuple[list[int], list[bool]]:
        """A question sequence on a `_question_image`: UniCycle questions or oracle-answered facts."""
        from model.world import questions, verify
        m = self.mix
        img, truth = self._question_image(spec, rng)
        qa = []
        if truth == "true" and rng.random() < m.unicycle_share:
            for q in questions(text, rng)[: m.qa_per_seq]:
                qtext = q.text if not q.choices else q.text
                qa.append((self.ids(qtext), self.ids(str(q.answer))))
        texts = [text]
        while len(qa) < m.qa_per_seq:
            # the prompt's own facts first, then facts of other prompts (of any category)
            v = verify(texts[-1], img)
            fs = list(v.facts)
            idx = list(range(len(fs)))
            rng.shuffle(idx)
            for i in idx[: m.qa_per_seq - len(qa)]:
                f = fs[i]
                ok = v.fact_ok[i]
                ans = f.expected if ok else ("no" if f.expected == "yes" else "yes")
                qa.append((self.ids(f.question), self.ids(ans)))
            if len(qa) < m.qa_per_seq:
                texts.append(self._prompt_text(self._prompt(rng)[1]))
        rng.shuffle(qa)
        s = S.question_seq(self.v, self._codes(img), qa)
        # trim to max_len by dropping trailing pairs
        while len(s[0]) > self.max_len and len(qa) > 1:
            qa.pop()
            s = S.question_seq(self.v, self._codes(img), qa)
        return s

    def fact_qa(self, prompt: str, img, rng: random.Random, n: int, codes=None) -> tuple[list[int], list[bool]]:
        """A question sequence about an image: the prompt's facts, topped up with facts of other prompts,
        answered by the exact oracle on the image itself."""
        from model.world import verify
        qa: list[tuple[list[int], list[int]]] = []
        texts = [prompt]
        while len(qa) < n:
            v = verify(texts[-1], img)
            idx = list(range(len(v.facts)))
            rng.shuffle(idx)
            for i in idx[: n - len(qa)]:
                f = v.facts[i]
                ans = f.expected if v.fact_ok[i] else ("no" if f.expected == "yes" else "yes")
                qa.append((self.ids(f.question), self.ids(ans)))
            if len(qa) < n:
                texts.append(self._prompt_text(self._prompt(rng)[1]))
        rng.shuffle(qa)
        codes = self._codes(img) if codes is None else codes
        s = S.question_seq(self.v, codes, qa)
        while len(s[0]) > self.max_len and len(qa) > 1:
            qa.pop()
            s = S.question_seq(self.v, codes, qa)
        return s

    def build(self, n: int, seed: int) -> dict[str, np.ndarray]:
        rng = random.Random(seed)
        ids = np.full((n, self.max_len), self.v.PAD, dtype=np.int16)
        tg = np.zeros((n, self.max_len), dtype=bool)
        kinds = np.zeros(n, dtype=np.int8)
        lens = np.zeros(n, dtype=np.int16)
        for i in range(n):
            s, t, k = self.one(rng)
            if len(s) > self.max_len:
                s, t = s[: self.max_len], t[: self.max_len]
            ids[i, : len(s)] = s
            tg[i, : len(t)] = t
            kinds[i] = k
            lens[i] = len(s)
        return {"ids": ids, "targets": tg, "kinds": kinds, "lens": lens}


_WORKER: CorpusBuilder | None = None


def _init_worker(builder: CorpusBuilder) -> None:
    global _WORKER
    import torch
    torch.set_num_threads(1)
    _WORKER = builder


def _build_chunk(args):
    n, seed = args
    return _WORKER.build(n, seed)


def build_corpus(builder: CorpusBuilder, n: int, seed: int, workers: int = 1, chunk: int = 2000,
                 progress=None) -> dict[str, np.ndarray]:
    """n sequences, made in chunks (each chunk seeded from `seed` and its index: the same corpus for any
    number of workers)."""
    jobs = [(min(chunk, n - s), seed * 1_000_003 + i) for i, s in enumerate(range(0, n, chunk))]
    parts = []
    if workers <= 1:
        for j in jobs:
            parts.append(builder.build(*j))
            if progress:
                progress(j[0])
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(builder,)) as pool:
            for part in pool.imap(_build_chunk, jobs):
                parts.append(part)
                if progress:
                    progress(len(part["kinds"]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fit_codebook(n_masks: int, n_images: int, seed: int, size: int = 32) -> PatchCodebook:
    """The most frequent exact 4x4 foreground masks over true, wrong and random world images."""
    from model.world import CATEGORIES, parse, render, sample_prompt, sample_scene
    rng = random.Random(seed)
    arrs = []
    for i in range(n_images):
        cat = CATEGORIES[i % len(CATEGORIES)]
        p = sample_prompt(cat, rng)
        text = p if isinstance(p, str) else p.text
        scene = sample_scene(parse(text).spec, rng)
        if i % 4 == 3:
            scene = mutate_scene(scene, rng)
        if i % 7 == 6:
            scene = distractor_scene(rng)
        arrs.append(image_to_array(render(scene, size)))
    colors, backgrounds = world_palette()
    return PatchCodebook.fit(np.stack(arrs), colors, backgrounds, n_masks=n_masks, size=size)


def world_palette() -> tuple[np.ndarray, np.ndarray]:
    """(object colours (C, 3), backgrounds (B, 3)) in the world's order."""
    from model.world import vocab as V
    col = getattr(V, "COLOR_RGB", None) or V.COLORS
    bg = getattr(V, "BACKGROUND_RGB", None) or V.BACKGROUNDS
    return np.array(list(col.values()), np.uint8), np.array(list(bg.values()), np.uint8)
