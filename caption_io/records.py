"""The TFRecord format of a data directory: the one place that names its keys.

One tf.train.Example per image (docs/ARCHITECTURE.md): the image's feature map once,
and every caption of the image. Features are raw float16 bytes rather than a
float_list, because a float_list stores 4 bytes a value and would double the
shards; token ids are a flat int64 list plus one length per caption (a ragged
[captions, tokens] matrix), and varint-encoded ids cost ~1 byte each.

The pipeline writes with `make_example` and `frame`; the trainer, evaluator and
tests read with `parse_examples` (batched, inside tf.data). Nothing else spells
the keys; the shards' names are caption_io.datadir's (imported here for the readers of shards).
A feature map's shape [positions, channels] is the encoder's (caption_io.geometry), which
metadata.json records: readers pass it in.
"""
from __future__ import annotations

import struct

import google_crc32c
import numpy as np
import tensorflow as tf

from caption_io.datadir import (  # noqa: F401  (the shards' names, read through this module too)
    METADATA_FILE,
    SHARD_SUFFIX,
    SHARD_TEMPLATE,
    SPLITS,
    shard_glob,
    shard_name,
    shard_prefix,
)

FEATURE_DTYPE = np.float16

IMAGE_ID = "image/id"
FILE_NAME = "image/file_name"
FEATURES = "image/features"
CAPTION_IDS = "caption/ids"
CAPTION_LENGTHS = "caption/lengths"
CAPTION_TEXT = "caption/text"


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record in TFRecord framing: length, its masked CRC-32C, the bytes,
    their masked CRC-32C. Shard files are these frames back to back, so a
    writer can stream them to any file system (local, or gs:// through Beam's
    FileSystems) without TensorFlow's file layer."""
    length = struct.pack("<Q", len(record))
    return b"".join((length, struct.pack("<I", _masked_crc(length)), record, struct.pack("<I", _masked_crc(record))))


def make_example(image_id: int, file_name: str, features: np.ndarray,
                 caption_ids: list[list[int]], caption_texts: list[str], feature_shape: tuple[int, int]) -> bytes:
    """Serialise one image and its captions; `features` must be the data directory's [positions, channels]."""
    features = np.asarray(features)
    if features.shape != tuple(feature_shape):
        raise ValueError(f"image {image_id}: features have shape {features.shape}, expected {tuple(feature_shape)}")
    if len(caption_ids) != len(caption_texts) or not caption_ids:
        raise ValueError(f"image {image_id}: needs one or more captions, each with ids and text")
    flat = [int(t) for ids in caption_ids for t in ids]
    feature = {
        IMAGE_ID: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(image_id)])),
        FILE_NAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[file_name.encode("utf-8")])),
        FEATURES: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[features.astype(FEATURE_DTYPE).tobytes()])),
        CAPTION_IDS: tf.train.Feature(int64_list=tf.train.Int64List(value=flat)),
        CAPTION_LENGTHS: tf.train.Feature(int64_list=tf.train.Int64List(
            value=[len(ids) for ids in caption_ids])),
        CAPTION_TEXT: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[t.encode("utf-8") for t in caption_texts])),
    }
    # deterministic: the feature map's keys in order, so a record's bytes (and a shard's sha256) are the
    # same from every process; protobuf's map order otherwise changes from one process to the next.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


_SPEC = {
    IMAGE_ID: tf.io.FixedLenFeature([], tf.int64),
    FILE_NAME: tf.io.FixedLenFeature([], tf.string),
    FEATURES: tf.io.FixedLenFeature([], tf.string),
    CAPTION_TEXT: tf.io.RaggedFeature(tf.string),
    # [captions, tokens]: the flat ids partitioned by each caption's length.
    "captions": tf.io.RaggedFeature(
        tf.int64, value_key=CAPTION_IDS,
        partitions=[tf.io.RaggedFeature.RowLengths(CAPTION_LENGTHS)]),
}


def parse_examples(serialized: tf.Tensor, feature_shape: tuple[int, int] | None) -> dict:
    """Parse a batch of serialised examples (a string vector).

    Returns image_id [B] int64, file_name [B] string, features [B, positions, channels]
    float16 (`feature_shape`; None: left flat, [B, positions * channels], for readers of the
    captions alone), captions [B, (captions), (tokens)] int32 ragged, caption_text
    [B, (captions)] string ragged. Works eagerly and inside tf.data.map.
    """
    parsed = tf.io.parse_example(serialized, _SPEC)
    features = tf.io.decode_raw(parsed[FEATURES], tf.float16)
    if feature_shape is not None:
        features = tf.reshape(features, [-1, *feature_shape])
    return {
        "image_id": parsed[IMAGE_ID],
        "file_name": parsed[FILE_NAME],
        "features": features,
        "captions": tf.cast(parsed["captions"], tf.int32),
        "caption_text": parsed[CAPTION_TEXT],
    }


def beside(shards: list[str]) -> tuple[int, int]:
    """The feature shape metadata.json records in the data directory that holds `shards`."""
    import os

    from caption_io import metadata  # metadata does not import this module

    if not shards:
        raise ValueError("no shard files")
    return metadata.read(os.path.dirname(shards[0]) or ".").features.shape


def read_records(paths, feature_shape: tuple[int, int] | None = None) -> list[dict]:
    """Every record of some shard files as plain numpy/python values (for tests and tools); the
    features' shape is `feature_shape`, else the one metadata.json beside the first shard records."""
    paths = list(paths)
    feature_shape = feature_shape or beside(paths)
    out = []
    ds = tf.data.TFRecordDataset(paths).batch(64)
    for batch in ds:
        p = parse_examples(batch, feature_shape)
        captions, texts = p["captions"].to_list(), p["caption_text"].to_list()
        for i in range(len(captions)):
            out.append({
                "image_id": int(p["image_id"][i]),
                "file_name": p["file_name"][i].numpy().decode("utf-8"),
                "features": p["features"][i].numpy(),
                "captions": captions[i],
                "caption_text": [t.decode("utf-8") for t in texts[i]],
            })
    return out
