"""The words of the generated scene set (pipelines.synthetic), and how a caption names its objects.

The scene set's pictures hold one to three flat shapes, each of a colour, a shape and a size in a
cell of a coarse 3x2 grid; its captions say those things in these words. The generator draws with
them and the exact-objects evaluator (caption_eval.evaluators.exact_objects) reads captions with
them, so both import them from here.
"""
from __future__ import annotations

import re

COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Objects sit in the cells of a coarse 3x2 grid, one object per cell, so they
# never overlap and "where" reduces to a column word and a row word.
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "bottom")
# The words by which a caption says where an object is ("in the top left", "on the left side",
# "near the top", "a red circle above a blue square").
POSITION_WORDS = frozenset(COLUMNS + ROWS + ("above",))

_WORD = re.compile(r"[a-z]+")


def objects_in_caption(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: a colour word directly
    followed by a shape word (the templates always say "red circle"); a plural
    shape ("red circles") counts as the singular."""
    words = _WORD.findall(text.lower())
    pairs = set()
    for colour, shape in zip(words, words[1:]):
        if shape not in SHAPES and shape.endswith("s"):
            shape = shape[:-1]
        if colour in COLOURS and shape in SHAPES:
            pairs.add((colour, shape))
    return pairs
