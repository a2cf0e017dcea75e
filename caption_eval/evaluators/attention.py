"""Attention correctness: how much of a word's attention falls on the object it
names, read from a COCO instances file's boxes."""
from __future__ import annotations

from collections import Counter

import numpy as np

from caption_io import cjk, fileio, geometry, scenes
from caption_io import text as text_lib


def cell_coverage(bbox, width: float, height: float, grid: tuple[int, int]) -> np.ndarray:
    """[rows * columns] (row-major, as the encoder flattens its map): the fraction of each
    cell's area inside the box [x, y, w, h] given in image pixels; grid: the encoder's
    (rows, columns).

    The encoder stretches the image to its square input without keeping its aspect ratio, so
    the columns split the width, and the rows the height, into equal parts. Fractional cover
    rather than centre-in-box: a box of 1.5 cells counts as 1.5, not 1 or 2, so the chance
    level is exactly the box's share of the image.
    """
    rows, columns = grid
    x, y, w, h = (float(v) for v in bbox)

    def overlap(lo, hi, cells):  # per cell interval [k, k+1]: the length inside [lo, hi]
        edges = np.arange(cells + 1, dtype=np.float64)
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, 1.0)

    across = overlap(x / width * columns, (x + w) / width * columns, columns)
    down = overlap(y / height * rows, (y + h) / height * rows, rows)
    return np.outer(down, across).reshape(-1)


def load_instances(path: str) -> dict:
    """A COCO instances file -> {"images": {image_id: {"width", "height", "objects", "novel_pair"}},
    "vocabulary": every word that names some object, "novel_pairs": the (colour, shape) pairs
    held out of training, or None}. An object is {"name", "colour" (scene set only, else None),
    "bbox", "words"}: its words are its category name's words plus its colour, normalised like
    captions, and the Chinese names of its colour and shape (scenes.zh_names; only the scene
    set's words have any), so a Chinese caption names the object too. "novel_pair" says whether
    the image holds a held-out pair (None where the file holds out none: a scene set made with
    pipelines.synthetic --novel-pairs does)."""
    data = fileio.read_json(path)
    cats = {c["id"]: c["name"] for c in data["categories"]}
    cat_words = dict(zip(cats, text_lib.words(list(cats.values()))))
    images = {int(im["id"]): {"width": float(im["width"]), "height": float(im["height"]), "objects": [],
                              "novel_pair": im.get("novel_pair")} for im in data["images"]}
    vocabulary = set()
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        colour = ann.get("colour")
        words = set(cat_words[ann["category_id"]]) | ({colour} if colour else set())
        words |= {name for w in words for name in scenes.zh_names(w)}
        vocabulary |= words
        images[int(ann["image_id"])]["objects"].append(
            {"name": cats[ann["category_id"]], "colour": colour, "bbox": ann["bbox"], "words": words})
    novel = (data.get("info") or {}).get("novel_pairs")
    return {"images": images, "vocabulary": vocabulary, "novel_pairs": [tuple(p) for p in novel] if novel else None}


def _object_word(word: str, vocabulary: set) -> str | None:
    if word in vocabulary:
        return word
    if word.endswith("s") and word[:-1] in vocabulary:  # "circles" -> "circle"
        return word[:-1]
    return None


def _character(word: str) -> bool:
    return len(word) == 1 and cjk.is_cjk(word)


def _stems(words: list[str], vocabulary: set) -> list[str | None]:
    """Per word, the vocabulary word it is (part of), or None.

    Chinese comes a character a word ("红", "色", "的", "圆", "形"), so a run of characters is
    read against the vocabulary, longest word first: each character of "红色" is "红色". A
    character is an object word only inside such a word: the "色" and "形" every colour and
    shape ends with name nothing alone, nor the "三" of "三个" (three) or the "方" of "左上方".
    """
    stems = [None if _character(w) else _object_word(w, vocabulary) for w in words]
    i = 0
    while i < len(words):
        run = i
        while run < len(words) and _character(words[run]):
            run += 1
        for end in range(run, i, -1):
            if "".join(words[i:end]) in vocabulary:
                stems[i:end] = ["".join(words[i:end])] * (end - i)
                i = end
                break
        else:
            i += 1
    return stems


def named_objects(words: list[str], objects: list[dict], vocabulary: set) -> list[list[int] | None]:
    """Per word: None when it names no kind of object, else the indices of the
    image's objects it names (may be empty, or several: the caller decides).

    A run of object words is read as one phrase ("red circle", "hot dog"; in Chinese
    "红色的圆形" too, across the "的"), so in a scene with a red circle and a red square,
    the "red" of "red circle" names the circle alone. When no object fits the whole
    phrase (the caption is wrong), each word names the objects that fit it alone.
    Each character of a Chinese name is a word naming what the name does (see _stems).
    """
    out: list[list[int] | None] = [None] * len(words)
    stems = _stems(words, vocabulary)

    def in_phrase(t: int) -> bool:  # an object word, or a 的 between two
        return stems[t] is not None or (words[t] == scenes.ZH_LINK and t + 1 < len(words) and stems[t + 1] is not None)

    i = 0
    while i < len(words):
        if stems[i] is None:
            i += 1
            continue
        j = i
        while j < len(words) and in_phrase(j):
            j += 1
        phrase = [w for w in stems[i:j] if w is not None]
        whole = [k for k, o in enumerate(objects) if all(w in o["words"] for w in phrase)]
        for t in range(i, j):
            if stems[t] is not None:
                out[t] = whole or [k for k, o in enumerate(objects) if stems[t] in o["words"]]
        i = j
    return out


class AttentionCorrectness:
    """Share of a word's attention on the object it names, against chance.

    Only words that name exactly one object of their image count: a word naming no
    object there (a wrong word) has no right place to look, and one naming several
    (two red shapes, three people) could rightly look at any of them, so both are
    counted as skipped rather than scored. Shares are averaged over words; chance is
    the share uniform attention would give (covered cells / all cells), averaged the same way.

    grid: the encoder's (rows, columns), as the data directory's geometry gives it.
    """

    def __init__(self, instances: dict, grid: tuple[int, int]):
        self.images, self.vocabulary = instances["images"], instances["vocabulary"]
        self.grid = tuple(grid)
        self.shares, self.chances = [], []
        self.skipped = Counter()

    def add(self, item: dict) -> None:
        image = self.images.get(int(item["image_id"]))
        if image is None:
            self.skipped["images_without_boxes"] += 1
            return
        objects = image["objects"]
        for targets, weights in zip(named_objects(item["words"], objects, self.vocabulary), item["attention"]):
            if targets is None:
                continue
            if len(targets) != 1:
                self.skipped["words_naming_no_object" if not targets else "words_naming_several_objects"] += 1
                continue
            weights = np.asarray(weights, np.float64)
            geometry.grid_of(weights.size, self.grid)  # attention of another grid: a clear error, not a bad dot
            cover = cell_coverage(objects[targets[0]]["bbox"], image["width"], image["height"], self.grid)
            self.shares.append(float(np.dot(weights, cover)))
            self.chances.append(float(cover.sum() / cover.size))

    def summary(self) -> dict:
        share = float(np.mean(self.shares)) if self.shares else None
        chance = float(np.mean(self.chances)) if self.chances else None
        rows, columns = self.grid
        return {"words": len(self.shares), "share": share, "chance": chance,
                "ratio": share / chance if share is not None and chance else None,
                "skipped": dict(self.skipped),
                "cells": f"fraction of each cell's area inside the box, on the {rows}x{columns} grid"}
