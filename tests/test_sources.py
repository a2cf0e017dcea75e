"""Inputs other than the official COCO split: Karpathy's split, a user's JSON
lines, and the tutorial's caption subset."""
from __future__ import annotations

import glob
import json
import os

import pytest

from caption_io import metadata, records
from pipelines import preprocess, sources


def _coco(scene_dir, split):
    with open(os.path.join(scene_dir, "annotations", f"captions_{split}2014.json")) as f:
        return json.load(f)


def _karpathy_file(scene_dir, path):
    """Karpathy's dataset_coco.json shape, from the scene set: train images split
    into train and restval, val images into val and test."""
    images = []
    for split in ("train", "val"):
        data = _coco(scene_dir, split)
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a)
        for n, img in enumerate(data["images"]):
            k_split = ("train" if n % 2 == 0 else "restval") if split == "train" else ("val" if n % 2 == 0 else "test")
            images.append({"filepath": f"{split}2014", "filename": img["file_name"], "cocoid": img["id"],
                           "split": k_split, "sentences": [
                               {"raw": a["caption"], "tokens": a["caption"].split(), "sentid": a["id"]}
                               for a in caps[img["id"]]]})
    with open(path, "w") as f:
        json.dump({"dataset": "coco", "images": images}, f)
    return images


def test_karpathy_split_maps_restval_into_train(scene_dir, tmp_path):
    images = _karpathy_file(scene_dir, tmp_path / "dataset_coco.json")
    entries, rejects, source = sources.karpathy(scene_dir, str(tmp_path / "dataset_coco.json"))
    assert not rejects and source["kind"] == "karpathy"
    want = {s: {i["cocoid"] for i in images if sources.KARPATHY_SPLITS[i["split"]] == s}
            for s in ("train", "val", "test")}
    got = {s: {e["image_id"] for e in entries[s]} for s in entries}
    assert got == want
    assert all(os.path.exists(e["path"]) for s in entries for e in entries[s])


def test_karpathy_pipeline_writes_three_splits(scene_dir, tmp_path):
    _karpathy_file(scene_dir, tmp_path / "k.json")
    out = str(tmp_path / "data")
    meta = preprocess.run(["--coco-dir", scene_dir, "--karpathy-json", str(tmp_path / "k.json"), "--output", out,
                           "--encoder-weights", "random", "--num-shards", "1"])
    meta = metadata.Metadata.from_dict(meta)
    assert set(meta.splits) == {"train", "val", "test"}
    for split, info in meta.splits.items():
        recs = records.read_records(glob.glob(records.shard_glob(out, split)))
        assert len(recs) == info.images.written == info.images.seen > 0


def test_jsonl_input_for_your_own_images(scene_dir, tmp_path):
    data = _coco(scene_dir, "train")
    names = {i["id"]: i["file_name"] for i in data["images"]}
    lines = [json.dumps({"image": f"pics/{names[a['image_id']]}", "caption": a["caption"],
                         **({"split": "val"} if a["image_id"] == data["images"][0]["id"] else {})})
             for a in data["annotations"]]
    lines.append("this line is not json")
    lines.append(json.dumps({"image": "pics/missing.jpg", "caption": "a photo of nothing"}))
    os.symlink(os.path.join(scene_dir, "train2014"), tmp_path / "pics")
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "data")
    meta = preprocess.run(["--captions-jsonl", str(tmp_path / "mine.jsonl"), "--output", out,
                           "--encoder-weights", "random", "--num-shards", "1", "--val-fraction", "0"])
    meta = metadata.Metadata.from_dict(meta)
    assert meta.source.kind == "jsonl"
    assert meta.splits["val"].images.written == 1  # the line's own split wins
    assert meta.splits["train"].images == metadata.Counts(seen=len(names), written=len(names) - 1, rejected=1)
    rejects = [json.loads(line) for p in glob.glob(os.path.join(out, "rejected", "*")) for line in open(p)]
    reasons = sorted(r["reason"] for r in rejects)
    assert any("not a JSON object" in r for r in reasons) and any("missing" in r for r in reasons)
    recs = records.read_records(glob.glob(records.shard_glob(out, "train")))
    assert all(len(r["captions"]) == 5 for r in recs)


def test_max_captions_keeps_a_seeded_subset_with_their_images():
    entries = [{"image_id": i, "captions": [{"id": i * 10 + j, "text": f"c{i}{j}"} for j in range(5)]}
               for i in range(40)]
    a = sources.subsample_captions(entries, 30, seed=1)
    b = sources.subsample_captions(entries, 30, seed=1)
    c = sources.subsample_captions(entries, 30, seed=2)
    assert a == b and a != c
    assert sum(len(e["captions"]) for e in a) == 30
    assert all(e["captions"] for e in a)
    original = {e["image_id"]: {c["id"] for c in e["captions"]} for e in entries}
    assert all({c["id"] for c in e["captions"]} <= original[e["image_id"]] for e in a)
    assert sources.subsample_captions(entries, 1000, seed=1) == entries


def test_coco_2017_names_are_found(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "000000000001.jpg"}],
         "annotations": [{"id": 5, "image_id": 1, "caption": "x"}]}))
    entries, _, source = sources.coco(str(tmp_path))
    assert source["year"] == "2017"
    assert entries["train"][0]["path"] == os.path.join(str(tmp_path), "train2017", "000000000001.jpg")


def test_missing_layout_is_one_clear_error(tmp_path):
    with pytest.raises(sources.SourceError, match="captions_train"):
        sources.coco(str(tmp_path))
