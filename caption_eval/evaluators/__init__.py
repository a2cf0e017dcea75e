"""Evaluators: one per figure in metrics.json, so adding a metric is adding a file.

The captioned split is expensive to produce (a model call per batch) and is walked
once; every evaluator sees each image of it as it goes by, and is asked for its
figures at the end:

    add(item)    item: the dict `caption_eval.evaluate.caption_split` yields per image,
                 {"image_id", "file_name", "references", "caption", "words",
                  "attention" [len(words), positions]: row-major over the encoder's grid}
    summary()    -> a JSON-serialisable dict, what metrics.json records for it
"""
from __future__ import annotations

from typing import Protocol


class Evaluator(Protocol):
    def add(self, item: dict) -> None: ...

    def summary(self) -> dict: ...
