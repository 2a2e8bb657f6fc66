"""The closed world: shapes, colours, sizes, letters, geometry, and the vocabulary every text in it uses.

Everything here is a constant. The order of WORDS is part of the embedded model's tokenizer: only ever append.
"""

from __future__ import annotations

import re

CATEGORIES: tuple[str, ...] = (
    "single_object", "color_binding", "shape_binding", "counting", "spatial",
    "relative_size", "negation", "text_rendering", "background_style", "complex_scene",
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES} | {"letter": "letters"}

# Flat fills, far apart in RGB (min pairwise distance ~90) so nearest-palette classification survives +-20 noise.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "purple": (140, 40, 190), "orange": (245, 130, 20),
}
# Backgrounds never share a colour with objects: the oracle tells them apart by class alone.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)
SIZES: tuple[str, ...] = ("small", "large")
NUMERALS: dict[str, int] = {"one": 1, "two": 2, "three": 3}
MAX_OBJECTS = 3  # three objects fit a 2x2 grid without overlap, with a spare cell

# Spatial relations between things[0] and things[1]; size relations compare their sizes.
SPATIAL: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
SIZE_RELS: dict[str, str] = {"bigger": "bigger than", "smaller": "smaller than"}
RELATIONS: dict[str, str] = SPATIAL | SIZE_RELS
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above",
                            "bigger": "smaller", "smaller": "bigger"}

# 5x5 bitmap font; only letters that are 4-connected (one component) and are not the article "a".
GLYPHS: dict[str, tuple[str, ...]] = {
    "c": ("#####", "#....", "#....", "#....", "#####"),
    "e": ("#####", "#....", "####.", "#....", "#####"),
    "f": ("#####", "#....", "####.", "#....", "#...."),
    "h": ("#...#", "#...#", "#####", "#...#", "#...#"),
    "l": ("#....", "#....", "#....", "#....", "#####"),
    "p": ("#####", "#...#", "#####", "#....", "#...."),
    "t": ("#####", "..#..", "..#..", "..#..", "..#.."),
    "u": ("#...#", "#...#", "#...#", "#...#", "#####"),
}
LETTERS: tuple[str, ...] = tuple(GLYPHS)

# Geometry in a 32-pixel frame (scaled for other canvas sizes): a 2x2 grid of 16 px cells, one object per cell.
# Large 13 px and small 7 px objects (letters 10 px) differ enough that a 1-px edge error (which costs a stepped
# triangle 3 px of its box) cannot flip the size; only objects up to 10 px jitter (+-1 px), so neighbours always
# stay >= 3 px apart.
FRAME = 32
CELL_CENTERS: tuple[int, ...] = (8, 24)
SIZE_PX: dict[str, int] = {"small": 7, "large": 13}
JITTER: dict[str, int] = {"small": 1, "large": 0, "letter": 1}
LETTER_SCALE = 2  # glyph pixel -> 2x2 px at 32, so a letter is 10x10
LARGE_MIN_PX = 10  # a detected object whose side (sqrt(area / its shape's fill)) exceeds this is "large"
MIN_AREA = 6  # connected components under this many pixels (32 frame) are specks
REL_MARGIN = 4  # centres must differ by this much (32 frame) for a spatial relation

# Words of questions, answers, judge reasoning and the model's instructions (captions, proposals, reflection).
_EXTRA_WORDS = (
    "a", "an", "the", "and", "no", "on", "background", "shapes", "objects", "object", "letter", "letters",
    "to", "left", "right", "of", "above", "below", "bigger", "smaller", "than",
    "is", "are", "there", "any", "exactly", "what", "color", "shape", "size", "how", "many", "which", "where",
    "relative", "yes", "correct", "wrong", "score", "answer", "question", "choices", "or",
    "draw", "describe", "prompt", "made", "this", "image", "judge", "category", "example", "examples",
    "new", "fix", "improve", "rubric", "check", "facts", "fact", "expected",
)
_PUNCT = (",", ".", "?", ":", ";", "-", "(", ")", "/")
_NUMBERS = tuple(str(i) for i in range(11))  # scores 0-10, and digit counts that the parser rejects with a reason


def _ordered(*groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for w in group:
            seen.setdefault(w, None)
    return tuple(seen)


WORDS: tuple[str, ...] = _ordered(
    _PUNCT, _NUMBERS, _EXTRA_WORDS, NUMERALS, SIZES, COLORS, BACKGROUNDS, SHAPES, PLURALS.values(), LETTERS,
    CATEGORIES,
)

_TOKEN = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")


def tokenize(text: str) -> list[str]:
    """Lowercase words and single punctuation marks; every token of a valid text is in WORDS."""
    return _TOKEN.findall(text.lower())
