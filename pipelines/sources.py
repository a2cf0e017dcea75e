"""Where captioned images come from: the COCO layout, a Karpathy split file, or
a user's JSON-lines file. Each source becomes the same manifest.

A manifest entry is one image and its captions:
    {"split": "train", "image_id": 9, "file_name": "x.jpg", "path": "/coco/train2014/x.jpg",
     "captions": [{"id": 1, "text": "a dog on a sofa"}, ...]}
and a reject is an input that cannot be used, with its reason and what it held:
    {"split": "train", "kind": "caption", "input": {...}, "reason": "...", "images": 0, "captions": 1}

Annotation files are small next to the images (COCO's is ~80 MB), so they are
read here, on the machine that launches the pipeline; the pipeline then reads
the manifest from files and does the per-image work in parallel.
"""
from __future__ import annotations

import json
import random
import zlib
from collections import OrderedDict

from caption_io import cli, fileio


class SourceError(ValueError, cli.UserError):
    """Annotations that cannot be read at all (one readable line). Exit 1: the flags were
    well formed, the input data is not (as for a download that fails)."""

    exit_code = 1


def reject(split, kind, input_, reason, images=0, captions=0) -> dict:
    return {"split": split, "kind": kind, "input": input_, "reason": reason,
            "images": images, "captions": captions}


def _load_json(path: str, flag: str):
    if not fileio.exists(path):
        raise SourceError(f"{flag}: {path} does not exist")
    try:
        return fileio.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{flag}: {path} is not valid JSON ({e})") from None


class _Collector:
    """Groups captions by image, rejecting duplicates and orphans as it goes."""

    def __init__(self, split: str):
        self.split = split
        self.images: "OrderedDict[int, dict]" = OrderedDict()
        self.rejects: list[dict] = []
        self._ann_ids: set = set()
        self._texts: set = set()

    def add_image(self, image_id: int, file_name: str, path: str) -> None:
        self.images[image_id] = {"split": self.split, "image_id": image_id, "file_name": file_name,
                                 "path": path, "captions": []}

    def add_caption(self, ann_id, image_id, text) -> None:
        ann = {"id": ann_id, "image_id": image_id, "caption": text}
        if image_id not in self.images:
            self.rejects.append(reject(self.split, "caption", ann, f"annotation names no image (image_id {image_id})",
                                       captions=1))
        elif not isinstance(text, str):
            self.rejects.append(reject(self.split, "caption", ann, "caption is not a string", captions=1))
        elif ann_id is not None and ann_id in self._ann_ids:
            self.rejects.append(reject(self.split, "caption", ann, f"duplicate annotation id {ann_id}", captions=1))
        elif (image_id, " ".join(text.split())) in self._texts:
            self.rejects.append(reject(self.split, "caption", ann, "duplicate caption of the same image", captions=1))
        else:
            if ann_id is not None:
                self._ann_ids.add(ann_id)
            self._texts.add((image_id, " ".join(text.split())))
            self.images[image_id]["captions"].append({"id": ann_id, "text": text})

    def finish(self) -> tuple[list[dict], list[dict]]:
        entries = []
        for entry in self.images.values():
            if entry["captions"]:
                entries.append(entry)
            else:
                self.rejects.append(reject(self.split, "image",
                                           {k: entry[k] for k in ("image_id", "file_name", "path")},
                                           "image has no captions", images=1))
        return entries, self.rejects


def coco(coco_dir: str, year: str | None = None) -> tuple[dict, list[dict], dict]:
    """The official split: captions_{train,val}YEAR.json and the {train,val}YEAR/ folders."""
    years = [year] if year else ["2014", "2017"]
    for y in years:
        if fileio.exists(fileio.join(coco_dir, "annotations", f"captions_train{y}.json")):
            year = y
            break
    else:
        raise SourceError(f"--coco-dir {coco_dir}: no annotations/captions_train{{{','.join(years)}}}.json "
                          "(expected the standard COCO layout; see `python -m pipelines.download`)")
    entries, rejects = {}, []
    for split in ("train", "val"):
        path = fileio.join(coco_dir, "annotations", f"captions_{split}{year}.json")
        if split != "train" and not fileio.exists(path):
            continue
        data = _load_json(path, "--coco-dir")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise SourceError(f"--coco-dir: {path} is not a COCO captions file (needs 'images' and 'annotations')")
        c = _Collector(split)
        try:
            for img in data["images"]:
                c.add_image(int(img["id"]), img["file_name"], fileio.join(coco_dir, f"{split}{year}", img["file_name"]))
            for ann in data["annotations"]:
                c.add_caption(ann.get("id"), ann.get("image_id"), ann.get("caption"))
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"--coco-dir: {path} has a malformed entry ({type(e).__name__}: {e})") from None
        entries[split], split_rejects = c.finish()
        rejects += split_rejects
    return entries, rejects, {"kind": "coco", "path": coco_dir, "year": year}


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy(coco_dir: str, karpathy_json: str) -> tuple[dict, list[dict], dict]:
    """Karpathy's split file (dataset_coco.json): train + restval -> train, val, test."""
    data = _load_json(karpathy_json, "--karpathy-json")
    if not isinstance(data, dict) or "images" not in data:
        raise SourceError(f"--karpathy-json: {karpathy_json} is not a Karpathy split file (needs 'images')")
    collectors = {s: _Collector(s) for s in ("train", "val", "test")}
    try:
        for img in data["images"]:
            split = KARPATHY_SPLITS.get(img["split"])
            if split is None:
                raise SourceError(f"--karpathy-json: image {img.get('cocoid')} has unknown split {img['split']!r}")
            c = collectors[split]
            image_id = int(img.get("cocoid", img.get("imgid")))
            c.add_image(image_id, img["filename"], fileio.join(coco_dir, img.get("filepath", ""), img["filename"]))
            for s in img.get("sentences", []):
                c.add_caption(s.get("sentid"), image_id, s.get("raw"))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"--karpathy-json: {karpathy_json} has a malformed entry ({type(e).__name__}: {e})") from None
    entries, rejects = {}, []
    for split, c in collectors.items():
        entries[split], r = c.finish()
        rejects += r
    return entries, rejects, {"kind": "karpathy", "path": karpathy_json, "images_dir": coco_dir}


def _hash_split(path: str, val_fraction: float) -> str:
    # A stable hash of the path, so an image keeps its split when lines are added.
    return "val" if zlib.crc32(path.encode("utf-8")) % 10_000 < val_fraction * 10_000 else "train"


def jsonl(path: str, val_fraction: float = 0.05) -> tuple[dict, list[dict], dict]:
    """A user's own data: one {"image": path, "caption": text[, "split": s]} per line.
    Image paths are relative to the file's folder unless absolute or gs://."""
    if not fileio.exists(path):
        raise SourceError(f"--captions-jsonl: {path} does not exist")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    collectors = {s: _Collector(s) for s in ("train", "val", "test")}
    ids: dict[str, int] = {}
    rejects = []
    for n, line in enumerate(fileio.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
            if not isinstance(image, str) or not image:
                raise ValueError("'image' must be a path")
        except (ValueError, KeyError, TypeError) as e:
            rejects.append(reject("train", "caption", {"line": n, "text": line[:500]},
                                  f"line {n}: not a JSON object with 'image' and 'caption' ({e})", captions=1))
            continue
        full = image if (image.startswith("/") or fileio.is_gcs(image)) else fileio.join(base, image)
        split = row.get("split") or _hash_split(image, val_fraction)
        if split not in collectors:
            rejects.append(reject("train", "caption", {"line": n, "image": image, "caption": caption},
                                  f"line {n}: unknown split {split!r} (train, val or test)", captions=1))
            continue
        c = collectors[split]
        if full not in ids:
            ids[full] = len(ids) + 1
            c.add_image(ids[full], image, full)
        image_id = ids[full]
        if image_id not in c.images:  # the same image named under two splits
            rejects.append(reject(split, "caption", {"line": n, "image": image, "caption": caption},
                                  f"line {n}: image already belongs to another split", captions=1))
            continue
        c.add_caption(n, image_id, caption)
    entries = {}
    for split, c in collectors.items():
        entries[split], r = c.finish()
        rejects += r
    return entries, rejects, {"kind": "jsonl", "path": path, "val_fraction": val_fraction}


def subsample_captions(entries: list[dict], max_captions: int, seed: int) -> list[dict]:
    """A seeded random subset of `max_captions` captions, with their images
    (the tutorial trains on 30,000 shuffled captions). Images keep only the
    chosen captions; images with none are left out of the run."""
    pairs = [(i, j) for i, e in enumerate(entries) for j in range(len(e["captions"]))]
    if max_captions >= len(pairs):
        return entries
    keep = random.Random(seed).sample(pairs, max_captions)
    chosen: dict[int, list[int]] = {}
    for i, j in keep:
        chosen.setdefault(i, []).append(j)
    return [dict(entries[i], captions=[entries[i]["captions"][j] for j in sorted(js)])
            for i, js in sorted(chosen.items())]
