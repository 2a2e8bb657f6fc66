"""The prompt language: PromptSpec (what a prompt means), its canonical text, a parser that never raises,
seeded samplers per category, and scene sampling / minimal perturbation for ground truth.

Grammar (all lowercase, one canonical text per spec):
    prompt   := things ["and no" negated] ["on a" BACKGROUND "background"]
    things   := np [relation np] {"and" np}          (at most 3 objects in all)
    np       := ("a" | "an" | one | two | three) [size] color (shape | shapes | "letter" LETTER)
    negated  := [color] (shapes-plural | "shapes")
The category is not written in the text: it follows from the structure (see PromptSpec.category).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import lru_cache

from .scene import Obj, Scene
from .vocab import (BACKGROUNDS, CATEGORIES, CELL_CENTERS, COLORS, JITTER, LETTERS, MAX_OBJECTS, NUMERALS,
                    OPPOSITE, PLURALS, RELATIONS, SHAPES, SIZE_RELS, SIZES, SPATIAL, WORDS, tokenize)

NUMBER_WORDS = {v: k for k, v in NUMERALS.items()}
_SINGULAR = {p: s for s, p in PLURALS.items()}


@dataclass(frozen=True)
class Thing:
    """A noun phrase. `shape` is a SHAPES entry or "letter"; None only in a negation ("no red shapes")."""

    color: str | None
    shape: str | None
    size: str | None = None
    letter: str | None = None
    count: int | None = None  # None: the article "a"; 1-3: a number word (counting)

    @property
    def n(self) -> int:
        return self.count or 1

    @property
    def key(self) -> tuple:
        return self.color, self.shape, self.letter

    def describe(self, plural: bool = False) -> str:
        """The phrase without determiner: "small red circle", "red letter h", "blue squares"."""
        if self.shape == "letter":
            noun = f"letter {self.letter}"
        elif self.shape is None:
            noun = "shapes"
        else:
            noun = PLURALS[self.shape] if plural else self.shape
        return " ".join(w for w in (self.size, self.color, noun) if w)

    def text(self) -> str:
        det = ("an" if (self.size or self.color or "x")[0] in "aeiou" else "a") if self.count is None \
            else NUMBER_WORDS[self.count]
        return f"{det} {self.describe(plural=self.n > 1)}"

    def matches(self, obj: Obj) -> bool:
        """Does a (drawn or detected) object fit this phrase? "shapes" never covers letters."""
        if self.shape is None:
            shape_ok = obj.shape != "letter"
        else:
            shape_ok = obj.shape == self.shape and (self.letter is None or obj.letter == self.letter)
        return (shape_ok and (self.color is None or obj.color == self.color)
                and (self.size is None or obj.size == self.size))


@dataclass(frozen=True)
class PromptSpec:
    things: tuple[Thing, ...]
    relation: str | None = None  # between things[0] and things[1]: a SPATIAL or SIZE_RELS key
    negated: Thing | None = None
    background: str | None = None

    @property
    def category(self) -> str:
        if self.negated:
            return "negation"
        if self.background:
            return "background_style"
        if any(t.shape == "letter" for t in self.things):
            return "text_rendering"
        if self.relation in SIZE_RELS:
            return "relative_size"
        if self.relation or len(self.things) == 3:
            return "complex_scene" if len(self.things) == 3 else "spatial"
        if any(t.count is not None for t in self.things):
            return "counting"
        if len(self.things) == 1:
            return "single_object"
        return "color_binding" if self.things[0].shape == self.things[1].shape else "shape_binding"

    @property
    def n_objects(self) -> int:
        return sum(t.n for t in self.things)

    def to_text(self) -> str:
        parts = [self.things[0].text()]
        if self.relation:
            parts.append(RELATIONS[self.relation])
        for i, t in enumerate(self.things[1:], 1):
            parts += ([] if i == 1 and self.relation else ["and"]) + [t.text()]
        if self.negated:
            parts.append(f"and no {self.negated.describe(plural=True)}")
        if self.background:
            parts.append(f"on a {self.background} background")
        return " ".join(parts)


@dataclass(frozen=True)
class ParseResult:
    ok: bool
    spec: PromptSpec | None = None
    reason: str | None = None


class _Invalid(Exception):
    """Raised inside the parser only; parse() turns it into a reason."""


class _Cursor:
    def __init__(self, tokens: list[str]):
        self.toks, self.i = tokens, 0

    def peek(self, k: int = 0) -> str | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def next(self, wanted: str) -> str:
        tok = self.peek()
        if tok is None:
            raise _Invalid(f"prompt ends where {wanted} was expected")
        self.i += 1
        return tok

    def accept(self, *words: str) -> bool:
        if tuple(self.toks[self.i:self.i + len(words)]) == words:
            self.i += len(words)
            return True
        return False

    def one_of(self, options, wanted: str) -> str:
        tok = self.next(wanted)
        if tok not in options:
            raise _Invalid(f"expected {wanted}, got '{tok}'")
        return tok


_REL_PHRASES = sorted(((tuple(text.split()), key) for key, text in RELATIONS.items()), key=lambda p: -len(p[0]))


def _np(cur: _Cursor) -> Thing:
    det = cur.next("'a' or a number")
    if det.isdigit():
        n = int(det)
        raise _Invalid(f"count {n} out of range" if not 1 <= n <= 3
                       else f"count {n} must be a word ('{NUMBER_WORDS[n]}')")
    if det not in ("a", "an") and det not in NUMERALS:
        raise _Invalid(f"expected 'a' or a number, got '{det}'")
    count = NUMERALS.get(det)
    size = cur.next("a colour") if cur.peek() in SIZES else None
    color = cur.one_of(COLORS, "a colour")
    if cur.accept("letter"):
        return Thing(color, "letter", size, cur.one_of(LETTERS, "a letter"), count)
    noun = cur.next("a shape")
    if noun in SHAPES or noun in _SINGULAR and noun != "letters":
        plural = noun not in SHAPES
        if plural != ((count or 1) > 1):
            raise _Invalid(f"'{noun}' does not agree with '{det}'")
        return Thing(color, _SINGULAR.get(noun, noun), size, None, count)
    raise _Invalid(f"expected a shape, got '{noun}'")


def _parse(text: str) -> PromptSpec:
    if not text.strip():
        raise _Invalid("empty prompt")
    toks = tokenize(text)
    for tok in toks:
        if tok not in WORDS:
            raise _Invalid(f"unknown word '{tok}'")
    while toks and toks[-1] == ".":
        toks.pop()
    cur = _Cursor(toks)
    things, relation, negated, background = [_np(cur)], None, None, None
    for phrase, key in _REL_PHRASES:
        if cur.accept(*phrase):
            relation = key
            things.append(_np(cur))
            break
    while cur.peek() == "and" and cur.peek(1) != "no":
        cur.accept("and")
        things.append(_np(cur))
    if cur.accept("and", "no"):
        color = cur.next("a colour or shapes") if cur.peek() in COLORS else None
        noun = cur.one_of([p for p in _SINGULAR if p != "letters"] + ["shapes"], "a plural shape after 'no'")
        negated = Thing(color, _SINGULAR.get(noun))
    if cur.accept("on"):
        cur.one_of(("a", "an"), "'a'")
        background = cur.one_of(BACKGROUNDS, "a background colour")
        cur.one_of(("background",), "'background'")
    if cur.peek() is not None:
        raise _Invalid(f"unexpected word '{cur.peek()}'")
    spec = PromptSpec(tuple(things), relation, negated, background)
    _validate(spec)
    return spec


def _validate(spec: PromptSpec) -> None:
    """Meaning-level rules: what the renderer can draw and what cannot contradict itself."""
    if spec.n_objects > MAX_OBJECTS:
        raise _Invalid(f"too many objects ({spec.n_objects}, at most {MAX_OBJECTS})")
    keys = [t.key for t in spec.things]
    for i, t in enumerate(spec.things):
        if t.key in keys[:i]:
            raise _Invalid(f"'{t.describe()}' is named twice")
        if t.shape == "letter" and (t.size or t.count is not None):
            raise _Invalid("letters take no size or count")
        if spec.negated and spec.negated.matches(Obj(t.shape, t.color, t.size or "small", 0, 0, t.letter)):
            raise _Invalid(f"'{t.describe()}' contradicts 'no {spec.negated.describe(plural=True)}'")
    if spec.relation:
        a, b = spec.things[0], spec.things[1]
        if a.count is not None or b.count is not None:
            raise _Invalid("a relation needs single objects")
        if spec.relation in SIZE_RELS and (a.size or b.size or "letter" in (a.shape, b.shape)):
            raise _Invalid("a size relation takes shapes without size words")


def parse(text: str) -> ParseResult:
    """Prompt text -> spec; an invalid text gives ok=False and a reason, never an exception."""
    if not isinstance(text, str):
        return ParseResult(False, None, f"not a text ({type(text).__name__})")
    return _parse_cached(text)


@lru_cache(maxsize=65536)
def _parse_cached(text: str) -> ParseResult:
    try:
        return ParseResult(True, _parse(text))
    except _Invalid as exc:
        return ParseResult(False, None, str(exc))
    except Exception as exc:  # a parser bug must not take a stage down: report it as a reason
        return ParseResult(False, None, f"unparseable prompt ({type(exc).__name__})")


# ---- sampling --------------------------------------------------------------------------------------------------

def _fresh(rng: random.Random, taken: list[Thing], letter: bool = False, size: str | None = None) -> Thing:
    """A random thing whose (colour, shape/letter) is not yet named in this prompt."""
    while True:
        color = rng.choice(COLORS)
        t = Thing(color, "letter", None, rng.choice(LETTERS)) if letter else Thing(color, rng.choice(SHAPES), size)
        if t.key not in [x.key for x in taken]:
            return t


def _size(rng: random.Random) -> str | None:
    return rng.choice((None, "small", "large"))


def _things(rng: random.Random, n: int, sized: bool = True) -> list[Thing]:
    out: list[Thing] = []
    for _ in range(n):
        out.append(_fresh(rng, out, size=_size(rng) if sized else None))
    return out


def sample_spec(category: str, rng: random.Random) -> PromptSpec:
    """A random spec of one category; specs of a category are the structures PromptSpec.category maps to it."""
    if category == "single_object":
        return PromptSpec(tuple(_things(rng, 1)))
    if category == "color_binding":
        s, (c1, c2) = rng.choice(SHAPES), rng.sample(COLORS, 2)
        return PromptSpec((Thing(c1, s, _size(rng)), Thing(c2, s, _size(rng))))
    if category == "shape_binding":
        return PromptSpec(tuple(Thing(rng.choice(COLORS), s, _size(rng)) for s in rng.sample(SHAPES, 2)))
    if category == "counting":
        counts = rng.choice(((1,), (2,), (3,), (1, 1), (1, 2), (2, 1)))
        return PromptSpec(tuple(replace(t, count=n) for t, n in zip(_things(rng, len(counts)), counts)))
    if category == "spatial":
        return PromptSpec(tuple(_things(rng, 2)), rng.choice(list(SPATIAL)))
    if category == "relative_size":
        return PromptSpec(tuple(_things(rng, 2, sized=False)), rng.choice(list(SIZE_RELS)))
    if category == "negation":
        t = _things(rng, 1)[0]
        while True:
            form = rng.randrange(3)  # colour only, shape only, both
            neg = Thing(rng.choice(COLORS) if form != 1 else None, rng.choice(SHAPES) if form != 0 else None)
            if not neg.matches(Obj(t.shape, t.color, "small", 0, 0)):
                return PromptSpec((t,), negated=neg)
    if category == "text_rendering":
        letters: list[Thing] = []
        for _ in range(rng.choice((1, 2))):
            letters.append(_fresh(rng, letters, letter=True))
        return PromptSpec(tuple(letters))
    if category == "background_style":
        return PromptSpec(tuple(_things(rng, rng.choice((1, 2)))), background=rng.choice(BACKGROUNDS))
    if category == "complex_scene":
        return PromptSpec(tuple(_things(rng, 3)), rng.choice(list(SPATIAL)))
    raise ValueError(f"unknown category {category!r} (one of {', '.join(CATEGORIES)})")


def sample_prompt(category: str, rng: random.Random) -> str:
    return sample_spec(category, rng).to_text()


def prompt_count(category: str | None = None) -> int:
    """Exact number of distinct prompts the sampler of a category can produce (all categories when None)."""
    if category is None:
        return sum(prompt_count(c) for c in CATEGORIES)
    k, z, c = len(COLORS) * len(SHAPES), 3, len(COLORS)  # (colour, shape) keys, size options incl. none
    return {
        "single_object": k * z,
        "color_binding": len(SHAPES) * c * (c - 1) * z * z,
        "shape_binding": len(SHAPES) * (len(SHAPES) - 1) * c * c * z * z,
        "counting": k * z * 3 + 3 * k * (k - 1) * z * z,
        "spatial": k * (k - 1) * z * z * len(SPATIAL),
        "relative_size": k * (k - 1) * len(SIZE_RELS),
        # negations that do not cover the object: other colours, other shapes, other (colour, shape) pairs
        "negation": k * z * ((c - 1) + (len(SHAPES) - 1) + (k - 1)),
        "text_rendering": c * len(LETTERS) * (1 + c * len(LETTERS) - 1),
        "background_style": (k * z + k * (k - 1) * z * z) * len(BACKGROUNDS),
        "complex_scene": k * (k - 1) * (k - 2) * z**3 * len(SPATIAL),
    }[category]


def sample_scene(spec: PromptSpec, rng: random.Random) -> Scene:
    """A random scene that makes every fact of the spec true: one object per counted thing, nothing else,
    in distinct cells of the 2x2 grid (so objects never overlap)."""
    sizes: list[str] = []
    for i, t in enumerate(spec.things):
        if spec.relation in SIZE_RELS and i < 2:
            big_first = spec.relation == "bigger"
            sizes.append("large" if (i == 0) == big_first else "small")
        else:
            sizes.append("large" if t.shape == "letter" else t.size or rng.choice(SIZES))
    cells = [(r, c) for r in range(2) for c in range(2)]
    placed: list[tuple[int, int]] = []
    if spec.relation in SPATIAL:  # first two things share a row (left/right) or a column (above/below)
        k = rng.randrange(2)
        a, b = {"left": ((k, 0), (k, 1)), "right": ((k, 1), (k, 0)),
                "above": ((0, k), (1, k)), "below": ((1, k), (0, k))}[spec.relation]
        placed = [a, b]
    free = [cell for cell in cells if cell not in placed]
    rng.shuffle(free)
    objs: list[Obj] = []
    for t, size in zip(spec.things, sizes):
        for _ in range(t.n):
            r, c = placed[len(objs)] if len(objs) < len(placed) else free.pop()
            j = JITTER["letter" if t.shape == "letter" else size]
            objs.append(Obj(t.shape, t.color, size, CELL_CENTERS[c] + rng.randint(-j, j),
                            CELL_CENTERS[r] + rng.randint(-j, j), t.letter))
    return Scene(tuple(objs), spec.background or rng.choice(BACKGROUNDS))


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS, letter_share: float = 0.2) -> Scene:
    """A scene of 0..max_objects random objects (some letters) that no prompt asked for: pretraining material
    whose questions also have "no" answers."""
    things: list[Thing] = []
    for _ in range(rng.randint(0, max_objects)):
        things.append(_fresh(rng, things, letter=rng.random() < letter_share, size=rng.choice(SIZES)))
    return sample_scene(PromptSpec(tuple(things)), rng)


def perturb(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    """A minimally changed spec (one colour, shape, letter, size, count, relation, background or negation) whose
    scenes make the original prompt false. Used to measure that the oracle rejects near misses."""
    things = list(spec.things)
    keys = [t.key for t in things]
    options: list[PromptSpec] = []
    for i, t in enumerate(things):
        def swap(**kw) -> PromptSpec | None:
            new = replace(t, **kw)
            if new.key != t.key and new.key in keys:
                return None  # would merge with another named object: not a minimal change
            return replace(spec, things=tuple(things[:i] + [new] + things[i + 1:]))
        options.append(swap(color=rng.choice([c for c in COLORS if c != t.color])))
        if t.shape == "letter":
            options.append(swap(letter=rng.choice([x for x in LETTERS if x != t.letter])))
        else:
            options.append(swap(shape=rng.choice([s for s in SHAPES if s != t.shape])))
        if t.size:
            options.append(swap(size="small" if t.size == "large" else "large"))
        if t.count is not None:
            room = MAX_OBJECTS - spec.n_objects + t.count
            n = rng.choice([n for n in range(room + 1) if n != t.count])
            rest = things[:i] + ([replace(t, count=n)] if n else []) + things[i + 1:]
            options.append(replace(spec, things=tuple(rest)))
    if spec.relation:
        options.append(replace(spec, relation=OPPOSITE[spec.relation]))
    if spec.background:
        options.append(replace(spec, background=rng.choice([b for b in BACKGROUNDS if b != spec.background])))
    if spec.negated:  # draw what the prompt forbids
        neg = spec.negated
        shown = Thing(neg.color or rng.choice(COLORS), neg.shape or rng.choice(SHAPES))
        options.append(replace(spec, things=spec.things + (shown,), negated=None))
    options = [o for o in options if o is not None and o.things]
    return rng.choice(options)
