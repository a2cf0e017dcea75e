"""The preprocessing transforms one by one, on a handful of in-memory elements
(Beam's TestPipeline and assert_that), and the shard contract they write to."""
from __future__ import annotations

import glob
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from caption_io import geometry, records, vocab
from pipelines import shards
from pipelines.transforms import check, encode, vocabulary


def _entry(split, image_id, path, *texts, words=None):
    caps = [{"id": image_id * 10 + i, "text": t} for i, t in enumerate(texts)]
    if words is not None:
        caps = [dict(c, words=w) for c, w in zip(caps, words)]
    return {"split": split, "image_id": image_id, "file_name": os.path.basename(path), "path": path, "captions": caps}


@pytest.fixture
def pictures(tmp_path):
    """Three small images of different sizes, an empty file, bytes that are no image, a missing path."""
    rng = np.random.default_rng(0)
    paths = {}
    for i, size in enumerate([(40, 30), (64, 64), (31, 77)]):
        paths[f"good{i}"] = str(tmp_path / f"good{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[f"good{i}"])
    paths["empty"] = str(tmp_path / "empty.jpg")
    open(paths["empty"], "wb").close()
    paths["garbage"] = str(tmp_path / "garbage.jpg")
    with open(paths["garbage"], "wb") as f:
        f.write(b"this is not a picture" * 10)
    paths["missing"] = str(tmp_path / "missing.jpg")
    return paths


# --------------------------------------------------------------------------- CheckInputs


def test_check_inputs_keeps_good_entries_and_rejects_each_fault_with_its_reason(pictures):
    entries = [
        _entry("train", 1, pictures["good0"], "A red Square.", "   ...  "),  # one blank caption of two
        _entry("train", 2, pictures["good1"], "!!!", ""),                   # no caption left
        _entry("val", 3, pictures["garbage"], "a blue circle"),
        _entry("train", 4, pictures["empty"], "a green square"),
        _entry("train", 5, pictures["missing"], "a small circle"),
        _entry("val", 6, pictures["good2"], "two circles"),
    ]
    with BeamPipeline() as p:
        out = p | beam.Create(entries) | check.CheckInputs()
        ok = out["ok"] | "OkKeys" >> beam.Map(lambda e: (e["image_id"], [c["words"] for c in e["captions"]]))
        assert_that(ok, equal_to([(1, [["a", "red", "square"]]), (6, [["two", "circles"]])]), label="ok")
        why = out["rejected"] | "Reasons" >> beam.Map(
            lambda r: (r["kind"], r["input"].get("image_id"), r["images"], r["captions"], r["reason"].split(" (")[0]))
        assert_that(why, equal_to([
            ("caption", 1, 0, 1, "blank caption"),
            ("caption", 2, 0, 1, "blank caption"), ("caption", 2, 0, 1, "blank caption"),
            ("image", 2, 1, 0, "no usable caption"),  # its captions were counted above
            ("image", 3, 1, 1, "not an image"),
            ("image", 4, 1, 1, "empty file"),
            ("image", 5, 1, 1, "missing or unreadable file"),
        ]), label="rejected")


# --------------------------------------------------------------------------- BuildVocabulary


@pytest.mark.parametrize("max_words, min_count, expected", [
    (10, 1, ["a", "square", "red", "big", "blue"]),  # by falling count, ties alphabetical
    (2, 1, ["a", "square"]),                          # --vocab-size truncates the tail
    (10, 2, ["a", "square", "red"]),                  # --min-count drops rare words
])
def test_vocabulary_counts_training_words_only(max_words, min_count, expected):
    entries = [
        _entry("train", 1, "x", "", "", words=[["a", "red", "square"], ["a", "big", "square"]]),
        _entry("train", 2, "y", "", words=[["a", "blue", "red", "square"]]),
        _entry("val", 3, "z", "", words=[["a", "zebra", "zebra", "zebra"]]),  # val words never count
    ]
    with BeamPipeline() as p:
        tokens = p | beam.Create(entries) | vocabulary.BuildVocabulary("words", max_words, min_count)
        assert_that(tokens, equal_to([list(vocab.SPECIALS) + expected]))


# --------------------------------------------------------------------------- shards


def test_shard_assignment_is_balanced_and_does_not_depend_on_input_order():
    entries = [{"image_id": i * 7919 % 1000, "file_name": f"{i}.jpg"} for i in range(103)]
    shards.assign(entries, 8)
    by_id = {e["image_id"]: e["shard"] for e in entries}
    sizes = np.bincount(list(by_id.values()), minlength=8)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 103
    again = [dict(image_id=e["image_id"], file_name=e["file_name"]) for e in reversed(entries)]
    shards.assign(again, 8)
    assert {e["image_id"]: e["shard"] for e in again} == by_id


def test_framed_records_are_byte_identical_to_tensorflows_writer(tmp_path):
    payloads = [b"", b"x", os.urandom(300_000), b"caption" * 100]
    ours = b"".join(records.frame(r) for r in payloads)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in payloads:
            w.write(r)
    assert ours == (tmp_path / "tf.tfrecord").read_bytes()


def test_a_shard_that_fails_part_way_never_appears_under_its_final_name(tmp_path):
    path = str(tmp_path / records.shard_name("train", 0, 1))
    writer = shards.ShardWriter(path)
    writer.write(b"one record")
    assert glob.glob(path + shards.PARTIAL + "*") and not os.path.exists(path)
    writer.abort()  # what EncodeShard does when encoding or writing raises
    assert os.listdir(tmp_path) == []
    writer = shards.ShardWriter(path)
    writer.write(b"one record")
    info = writer.commit()
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert info["records"] == 1 and info["bytes"] == os.path.getsize(path)
    assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b"one record"]


# --------------------------------------------------------------------------- EncodeShards


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from model import backbones

    path = str(tmp_path_factory.mktemp("encoder") / "inception_v3.weights.h5")
    model = backbones.get("inception_v3").build("random", seed=2)
    backbones.save(model, path)
    return "inception_v3", path, backbones.weights_sha256(model)


def test_encode_shards_writes_every_shard_streaming_and_rejects_what_it_cannot_read(
        pictures, encoder_file, tmp_path):
    from model import backbones

    tokens = list(vocab.SPECIALS) + ["a", "red", "square"]
    entries = [_entry("train", i, pictures[f"good{i}"], "a red square", words=[["a", "red", "square"]])
               for i in range(3)]
    # vanished since checked
    entries.append(_entry("train", 9, pictures["missing"], "a square", words=[["a", "square"]]))
    # 4 images over 5 shards: shard 3 holds only the vanished image, shard 4 nothing; both are written, empty.
    shards.assign(entries, 5)
    out = str(tmp_path / "out")
    with BeamPipeline() as p:
        vocab_pc = p | "Vocab" >> beam.Create([tokens])
        res = p | beam.Create(entries) | encode.EncodeShards(out, {"train": 5}, vocab_pc, "words", *encoder_file,
                                                             batch_size=2, total_images=4)
        assert_that(res["shards"] | beam.Map(lambda s: (s["name"], s["records"], s["captions"], s["stats"]["count"])),
                    equal_to([(f"train-0000{i}-of-00005.tfrecord", *((1, 1, 64) if i < 3 else (0, 0, 0)))
                              for i in range(5)]), label="summaries")
        assert_that(res["rejected"] | beam.Map(lambda r: (r["input"]["image_id"], r["images"], r["captions"])),
                    equal_to([(9, 1, 1)]), label="rejected")
    inception = backbones.get("inception_v3")
    got = records.read_records(sorted(glob.glob(records.shard_glob(out, "train"))), inception.geometry.feature_shape)
    assert sorted(r["image_id"] for r in got) == [0, 1, 2]
    model = inception.load(encoder_file[1])
    for r in got:
        pixels = np.asarray(Image.open(pictures[f"good{r['image_id']}"]).convert("RGB"))
        expected = model(inception.prepare(pixels[None]), training=False).numpy()[0]
        np.testing.assert_allclose(r["features"].astype(np.float32), expected, rtol=2e-3,
                                   atol=2e-3 * np.abs(expected).max())
        assert r["captions"] == [[vocab.START_ID, 4, 5, 6, vocab.END_ID]]
    assert sorted(os.listdir(os.path.join(out, shards.DONE_DIR))) == [f"train-0000{i}-of-00005.json" for i in range(5)]
    assert os.path.getsize(os.path.join(out, "train-00004-of-00005.tfrecord")) == 0
    assert not glob.glob(os.path.join(out, "*" + shards.PARTIAL + "*"))


def test_encode_shards_keeps_finished_shards_and_redoes_changed_ones(pictures, encoder_file, tmp_path):
    tokens = list(vocab.SPECIALS) + ["a", "red", "square"]
    entries = [_entry("train", i, pictures[f"good{i}"], "a red square", words=[["a", "red", "square"]])
               for i in range(3)]
    shards.assign(entries, 3)
    out = str(tmp_path / "out")

    def run(es):
        with BeamPipeline() as p:
            vocab_pc = p | "Vocab" >> beam.Create([tokens])
            p | beam.Create(es) | encode.EncodeShards(out, {"train": 3}, vocab_pc, "words", *encoder_file,
                                                      batch_size=2, total_images=3)
        return {n: os.stat(os.path.join(out, n)).st_ino for n in os.listdir(out) if n.endswith(".tfrecord")}

    first = run(entries)
    assert run(entries) == first  # same inputs: every shard kept as it was (same files)
    changed = [dict(e) for e in entries]
    changed[1] = dict(changed[1], captions=[{"id": 1, "text": "a square", "words": ["a", "square"]}])
    third = run(changed)
    moved = {n for n in first if third[n] != first[n]}
    assert moved == {records.shard_name("train", changed[1]["shard"], 3)}
    rec = records.read_records([os.path.join(out, n) for n in moved], geometry.DEFAULT.feature_shape)
    assert rec[0]["caption_text"] == ["a square"]


# --------------------------------------------------------------------------- WriteMetadata


def _summary(name, records_, captions):
    return {"split": "train", "name": name, "records": records_, "bytes": 10 * records_, "sha256": "0" * 64,
            "images": records_, "captions": captions, "max_tokens": 7}


def test_write_metadata_checks_the_counts_and_lists_every_shard(tmp_path):
    from caption_io import metadata as metadata_lib
    from pipelines.transforms import metadata

    static = metadata_lib.Metadata(
        format_version=metadata_lib.FORMAT_VERSION, created="2026-01-01T00:00:00Z", command="a test",
        source=metadata_lib.Source(kind="coco", path="coco", year="2014"),
        encoder=metadata_lib.Encoder(name="inception_v3", architecture="InceptionV3/mixed10", weights="random", seed=0,
                                     file="enc.h5", sha256="0" * 64, input_size=299, input_scaling="x / 127.5 - 1",
                                     grid=(8, 8), channels=2048),
        features=metadata_lib.Features(shape=geometry.DEFAULT.feature_shape, dtype="float16", standardise="per channel",
                                       stats_file=metadata.STATS_FILE, stats_count=0),
        vocab=metadata_lib.Vocab(file="vocab.txt", size=0, max_words=10, min_count=1, specials=vocab.SPECIALS,
                                 built_from="train", tokenizer="words"),
        splits={"train": metadata.planned_split(2, "train-SSSSS-of-NNNNN.tfrecord")},
        rejected="rejected/", inputs="inputs/")
    fn = metadata.WriteMetadata(str(tmp_path), static)
    tokens = list(vocab.SPECIALS) + ["a"]
    stats_ = {"count": 128, "mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32)}
    summaries = [_summary("train-00001-of-00002.tfrecord", 1, 5), _summary("train-00000-of-00002.tfrecord", 2, 9)]
    counts = {("train", "images", "seen"): 4, ("train", "images", "written"): 3, ("train", "images", "rejected"): 1,
              ("train", "captions", "seen"): 15, ("train", "captions", "written"): 14,
              ("train", "captions", "rejected"): 1}
    (meta,) = fn.process(None, tokens, stats_, counts, summaries)
    train = meta.splits["train"]
    assert train.images == metadata_lib.Counts(seen=4, written=3, rejected=1)
    assert [f.name for f in train.files] == [s["name"] for s in reversed(summaries)]
    assert train.max_tokens == 7 and meta.vocab.size == 5 and meta.features.stats_count == 128
    assert json.load(open(tmp_path / "metadata.json")) == meta.to_dict()
    assert metadata_lib.read(str(tmp_path)) == meta

    lost = {**counts, ("train", "captions", "written"): 13}  # a caption neither written nor rejected
    with pytest.raises(RuntimeError, match="train captions: seen 15 != written 13 \\+ rejected 1"):
        list(fn.process(None, tokens, stats_, lost, summaries))
    with pytest.raises(RuntimeError, match="1 shards written, 2 planned"):
        list(fn.process(None, tokens, stats_, counts, summaries[:1]))
