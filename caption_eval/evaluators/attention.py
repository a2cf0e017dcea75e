"""Attention correctness: how much of a word's attention falls on the object it
names, read from a COCO instances file's boxes."""
from __future__ import annotations

from collections import Counter

import numpy as np

from caption_io import fileio, geometry
from caption_io import text as text_lib

GRID = geometry.GRID


def cell_coverage(bbox, width: float, height: float, grid: int = GRID) -> np.ndarray:
    """[grid*grid] (row-major, as the encoder flattens its map): the fraction of
    each cell's area inside the box [x, y, w, h] given in image pixels.

    The encoder stretches the image to 299x299 without keeping its aspect ratio, so
    the grid splits width and height each into `grid` equal parts. Fractional cover
    rather than centre-in-box: a box of 1.5 cells counts as 1.5, not 1 or 2, so the
    chance level is exactly the box's share of the image.
    """
    x, y, w, h = (float(v) for v in bbox)
    edges = np.arange(grid + 1, dtype=np.float64)

    def overlap(lo, hi):  # per grid interval [k, k+1]: the length inside [lo, hi]
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, 1.0)

    cols = overlap(x / width * grid, (x + w) / width * grid)
    rows = overlap(y / height * grid, (y + h) / height * grid)
    return np.outer(rows, cols).reshape(-1)


def load_instances(path: str) -> dict:
    """A COCO instances file -> {"images": {image_id: {"width", "height", "objects", "novel_pair"}},
    "vocabulary": every word that names some object, "novel_pairs": the (colour, shape) pairs
    held out of training, or None}. An object is {"name", "colour" (scene set only, else None),
    "bbox", "words"}: its words are its category name's words plus its colour, normalised like
    captions. "novel_pair" says whether the image holds a held-out pair (None where the file
    holds out none: a scene set made with pipelines.synthetic --novel-pairs does)."""
    data = fileio.read_json(path)
    cats = {c["id"]: c["name"] for c in data["categories"]}
    cat_words = dict(zip(cats, text_lib.words(list(cats.values()))))
    images = {int(im["id"]): {"width": float(im["width"]), "height": float(im["height"]), "objects": [],
                              "novel_pair": im.get("novel_pair")} for im in data["images"]}
    vocabulary = set()
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        colour = ann.get("colour")
        words = set(cat_words[ann["category_id"]]) | ({colour} if colour else set())
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


def named_objects(words: list[str], objects: list[dict], vocabulary: set) -> list[list[int] | None]:
    """Per word: None when it names no kind of object, else the indices of the
    image's objects it names (may be empty, or several: the caller decides).

    A run of object words is read as one phrase ("red circle", "hot dog"), so in a
    scene with a red circle and a red square, the "red" of "red circle" names the
    circle alone. When no object fits the whole phrase (the caption is wrong), each
    word names the objects that fit it alone.
    """
    out: list[list[int] | None] = [None] * len(words)
    stems = [_object_word(w, vocabulary) for w in words]
    i = 0
    while i < len(words):
        if stems[i] is None:
            i += 1
            continue
        j = i
        while j < len(words) and stems[j] is not None:
            j += 1
        phrase = stems[i:j]
        whole = [k for k, o in enumerate(objects) if all(w in o["words"] for w in phrase)]
        for t in range(i, j):
            out[t] = whole or [k for k, o in enumerate(objects) if stems[t] in o["words"]]
        i = j
    return out


class AttentionCorrectness:
    """Share of a word's attention on the object it names, against chance.

    Only words that name exactly one object of their image count: a word naming no
    object there (a wrong word) has no right place to look, and one naming several
    (two red shapes, three people) could rightly look at any of them, so both are
    counted as skipped rather than scored. Shares are averaged over words; chance is
    the share uniform attention would give (covered cells / 64), averaged the same way.
    """

    def __init__(self, instances: dict):
        self.images, self.vocabulary = instances["images"], instances["vocabulary"]
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
            cover = cell_coverage(objects[targets[0]]["bbox"], image["width"], image["height"])
            self.shares.append(float(np.dot(np.asarray(weights, np.float64), cover)))
            self.chances.append(float(cover.sum() / cover.size))

    def summary(self) -> dict:
        share = float(np.mean(self.shares)) if self.shares else None
        chance = float(np.mean(self.chances)) if self.chances else None
        return {"words": len(self.shares), "share": share, "chance": chance,
                "ratio": share / chance if share is not None and chance else None,
                "skipped": dict(self.skipped), "cells": "fraction of each 8x8 cell's area inside the box"}
