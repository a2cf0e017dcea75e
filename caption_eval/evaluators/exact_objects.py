"""Exact objects: on the scene set, whether a caption names exactly the image's
(colour, shape) objects. What counts as a colour or shape word, in English or Chinese,
is the scene set's vocabulary, caption_io.scenes, which the generator draws with too."""
from __future__ import annotations

from collections import defaultdict

from caption_io import scenes


def has_colours(instances: dict | None) -> bool:
    """Whether the boxes are the scene set's (every object has a colour): only then
    does naming the (colour, shape) pairs mean anything. No boxes (None): False."""
    if not instances:
        return False
    objects = [o for im in instances["images"].values() for o in im["objects"]]
    return bool(objects) and all(o["colour"] for o in objects)


def names_exactly(caption: str, objects: list[dict]) -> bool:
    """Whether a caption names exactly these objects' (colour, shape) pairs."""
    return scenes.objects_in_caption(caption) == {(o["colour"], o["name"]) for o in objects}


class ExactObjects:
    """Split by the number of objects, since multi-object scenes are where captioners fail.

    instances: as caption_eval.evaluators.attention.load_instances reads them."""

    def __init__(self, instances: dict):
        self.images = instances["images"]
        self.counts = defaultdict(lambda: [0, 0])  # objects in the scene -> [images, exact]

    def add(self, item: dict) -> None:
        image = self.images.get(int(item["image_id"]))
        if image is None:
            return
        row = self.counts[len(image["objects"])]
        row[0] += 1
        row[1] += names_exactly(item["caption"], image["objects"])

    def summary(self) -> dict:
        out = {str(n): {"images": t, "exact": e, "share": e / t} for n, (t, e) in sorted(self.counts.items())}
        total, exact = sum(t for t, _ in self.counts.values()), sum(e for _, e in self.counts.values())
        out["all"] = {"images": total, "exact": exact, "share": exact / total if total else None}
        return out
