"""Generalisation to new combinations: on a scene set with held-out (colour, shape) pairs
(pipelines.synthetic --novel-pairs), the figures of the val scenes holding a pair training
never showed, beside those of the scenes holding only seen pairs.

A captioner that binds a colour to the shape it sees names "a red triangle" even if training
only ever said "red circle" and "blue triangle"; one that memorised the pairs says "a red
circle". Exact objects on the novel scenes is the figure that tells the two apart.
"""
from __future__ import annotations

import numpy as np

from caption_eval.evaluators import attention, exact_objects

GROUPS = ("novel", "seen")


def has_novel_pairs(instances: dict | None) -> bool:
    return bool(instances and instances.get("novel_pairs"))


def group(instances: dict, image_id: int) -> str | None:
    """"novel" or "seen" for an image of the instances file, None for one it does not hold."""
    image = instances["images"].get(int(image_id))
    if image is None or image.get("novel_pair") is None:
        return None
    return GROUPS[0] if image["novel_pair"] else GROUPS[1]


class NovelPairs:
    """Exact objects, attention on the named object and CIDEr, per group.

    instances: as attention.load_instances reads them, from a file with held-out pairs.
    coco: the run's CocoMetrics; summary() reads its per-image CIDEr, so it must be
    summarised first (the evaluation does so). grid: the encoder's (rows, columns)."""

    def __init__(self, instances: dict, coco, grid: tuple[int, int]):
        self.instances, self.coco = instances, coco
        self.parts = {g: (exact_objects.ExactObjects(instances), attention.AttentionCorrectness(instances, grid), [])
                      for g in GROUPS}

    def add(self, item: dict) -> None:
        g = group(self.instances, item["image_id"])
        if g is None:
            return
        exact, looked, ids = self.parts[g]
        exact.add(item)
        looked.add(item)
        ids.append(item["image_id"])

    def summary(self) -> dict:
        out = {"pairs": [list(p) for p in self.instances["novel_pairs"]]}
        for g, (exact, looked, ids) in self.parts.items():
            cider = [self.coco.image_cider[i] for i in ids if i in self.coco.image_cider]
            where = looked.summary()
            out[g] = {"images": len(ids), "exact_objects": exact.summary()["all"]["share"],
                      "CIDEr": float(np.mean(cider)) if cider else None,
                      "attention_share": where["share"], "attention_ratio": where["ratio"]}
        return out
