"""Caption variety: whether a captioner says different things about different images, or one
safe sentence about all of them (self-critical training pulls towards the latter).

    distinct_captions  different captions over captions (1.0: all different; 1/n: one
                       caption for every image)
    openings           distinct first two words ("a picture", "there is", ...; written as the
                       caption writes them: "一个", not "一 个")
    vocabulary         distinct words used over the split
    mean_length        words a caption
    says_where         share of captions with a word that places an object ("left",
                       "top", "above": caption_io.scenes.POSITION_WORDS); scene set only
"""
from __future__ import annotations

from collections import Counter

from caption_io import tokenizer


class Variety:
    """position_words: the words that say where (None: not measured, data other than the scene set)."""

    def __init__(self, position_words: frozenset | None = None):
        self.position_words = position_words
        self.captions: list[tuple[str, ...]] = []

    def add(self, item: dict) -> None:
        self.captions.append(tuple(item["words"]))

    def summary(self) -> dict:
        n = len(self.captions)
        if not n:
            return {"captions": 0}
        counts = Counter(self.captions)
        openings = Counter(c[:2] for c in self.captions)
        out = {"captions": n,
               "distinct_captions": len(counts) / n,
               "openings": len(openings),
               "top_openings": [[tokenizer.join(list(o)), k] for o, k in openings.most_common(3)],
               "vocabulary": len({w for c in self.captions for w in c}),
               "mean_length": sum(map(len, self.captions)) / n}
        if self.position_words is not None:
            out["says_where"] = sum(1 for c in self.captions if self.position_words.intersection(c)) / n
        return out
