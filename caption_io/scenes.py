"""The words of the generated scene set (pipelines.synthetic), and how a caption names its objects.

The scene set's pictures hold one to three flat shapes, each of a colour, a shape and a size in a
cell of a coarse 3x2 grid; its captions say those things in these words. The generator draws with
them and the exact-objects evaluator (caption_eval.evaluators.exact_objects) reads captions with
them, so both import them from here. The same things have Chinese names too (ZH), for the scene
set whose captions are Chinese (pipelines.synthetic --language zh).
"""
from __future__ import annotations

import re
import unicodedata

COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Objects sit in the cells of a coarse 3x2 grid, one object per cell, so they
# never overlap and "where" reduces to a column word and a row word.
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "bottom")
# The words by which a caption says where an object is ("in the top left", "on the left side",
# "near the top", "a red circle above a blue square").
#
# The Chinese names of the same things. Chinese is written without spaces, and text normalisation
# makes each character a word of its own, so "红色" (red) reaches the evaluators as "红", "色".
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "white": "白色", "black": "黑色",
      "circle": "圆形", "square": "正方形", "triangle": "三角形",
      "small": "小", "large": "大",
      "left": "左", "middle": "中间", "right": "右", "top": "上", "bottom": "下"}
# May stand between a colour and its shape: "红色的圆形" names a red circle as "红色圆形" does.
ZH_LINK = "的"
# A Chinese caption places an object by characters of its own ("左", "上"; "中" of "中间"), which
# English captions never hold, so one set serves both languages.
POSITION_WORDS = frozenset(COLUMNS + ROWS + ("above",)) | {"左", "右", "上", "下", "中"}

_WORD = re.compile(r"[a-z]+")


def zh_names(word: str) -> tuple[str, ...]:
    """The Chinese words that name what a colour or shape word does: a colour by its name or its
    first character alone ("红色", "红", as in "红圆形"), a shape by its full name only ("圆形":
    "三" is also "three", "方" also a side in "左上方"); () for any other word."""
    if word in COLOURS:
        return ZH[word], ZH[word][0]
    return (ZH[word],) if word in SHAPES else ()


_ZH_CANONICAL = {name: word for word in COLOURS + SHAPES for name in zh_names(word)}
_ZH_OBJECT = re.compile("({})({})?({})".format(
    "|".join(n for c in COLOURS for n in zh_names(c)), ZH_LINK, "|".join(ZH[s] for s in SHAPES)))


def _is_gap(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def objects_in_caption(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in English or Chinese.

    English: a colour word directly followed by a shape word (the templates always say "red
    circle"); a plural shape ("red circles") counts as the singular.
    Chinese: a colour ("红色", or "红" alone), then at most a "的", then a shape's full name
    ("圆形", "正方形", "三角形"): "红色的圆形", "红色圆形" and "红圆形" are a red circle; "红色的圆"
    and "红色的小圆形" name none, as "red round" and "red large circle" do not. Spaces and
    punctuation between the characters are passed over, so a caption reads the same before and
    after text normalisation (which spaces the characters and turns punctuation into spaces).
    """
    words = _WORD.findall(text.lower())
    pairs = set()
    for colour, shape in zip(words, words[1:]):
        if shape not in SHAPES and shape.endswith("s"):
            shape = shape[:-1]
        if colour in COLOURS and shape in SHAPES:
            pairs.add((colour, shape))
    joined = "".join(ch for ch in text if not _is_gap(ch))
    pairs.update((_ZH_CANONICAL[m[1]], _ZH_CANONICAL[m[3]]) for m in _ZH_OBJECT.finditer(joined))
    return pairs
