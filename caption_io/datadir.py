"""The layout of a data directory: the names of its files and folders, each spelled here once.

    DATA_DIR/
      train-SSSSS-of-NNNNN.tfrecord  the shards, one tf.train.Example per image (caption_io.records);
      val-…  test-…                  SHARD.partial-<hex> while one is written (pipelines.shards)
      shards/SHARD.json              what a finished shard holds, written after it: a rerun keeps it
      vocab.txt                      the vocabulary, line number = id (caption_io.vocab)
      feature_stats.npz              per-channel mean and std over the training split
      encoder/NAME.weights.h5        the weights that made the features (the export loads them);
                                     NAME is the backbone (model.backbones), e.g. inception_v3
      inputs/SPLIT.jsonl             the manifest of what was read, a split's images with their captions
      inputs/rejected-annotations.jsonl  the annotations that could not be used
      rejected/rejected-SSSSS-of-NNNNN.jsonl  every input that could not be used, with its reason
      metadata.json                  written last: what the directory holds (caption_io.metadata);
                                     a directory without it is an unfinished run

pipelines.preprocess writes it; the trainer, the export, evaluation and the validator read it,
each through these names (metadata.json records several of them, so a reader follows the file).
"""
from __future__ import annotations

import fnmatch

SPLITS = ("train", "val", "test")
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.txt"
STATS_FILE = "feature_stats.npz"
ENCODER_DIR = "encoder"
DONE_DIR = "shards"          # the finished shards' records
INPUTS = "inputs"            # the manifests
REJECTED = "rejected"        # the rejects, with their reasons
ANNOTATION_REJECTS = f"{INPUTS}/rejected-annotations.jsonl"
REJECTS_PREFIX = f"{REJECTED}/rejected"  # + Beam's -SSSSS-of-NNNNN + .jsonl

SHARD_SUFFIX = ".tfrecord"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"  # Beam's template: train-00000-of-00004.tfrecord
PARTIAL = ".partial-"               # a shard being written: NAME.partial-<hex>, renamed to NAME when whole


def shard_prefix(data_dir: str, split: str) -> str:
    return f"{data_dir.rstrip('/')}/{split}"


def shard_name(split: str, index: int, count: int) -> str:
    """train-00003-of-00016.tfrecord: the file name of shard `index` of `count`."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def shard_glob(data_dir: str, split: str) -> str:
    return f"{shard_prefix(data_dir, split)}-?????-of-?????{SHARD_SUFFIX}"


def shard_pattern(split: str) -> str:
    """A split's shard names as Beam's template (metadata.json's "pattern"): train-SSSSS-of-NNNNN.tfrecord."""
    return f"{split}{SHARD_TEMPLATE}{SHARD_SUFFIX}"


def is_shard_name(name: str) -> bool:
    """Whether `name` (relative to the data directory) is a shard of any split."""
    return any(fnmatch.fnmatch(name, shard_glob("", s).lstrip("/")) for s in SPLITS)


def done_name(shard: str) -> str:
    """shards/train-00003-of-00016.json: the record of a finished shard, relative to the data directory."""
    return f"{DONE_DIR}/{shard.removesuffix(SHARD_SUFFIX)}.json"


def encoder_file(backbone: str) -> str:
    """encoder/inception_v3.weights.h5: the weights of backbone `backbone`, relative to the data directory."""
    return f"{ENCODER_DIR}/{backbone}.weights.h5"


def manifest(split: str) -> str:
    """inputs/train.jsonl: a split's manifest, relative to the data directory."""
    return f"{INPUTS}/{split}.jsonl"


def folder(name: str) -> str:
    """A folder of the data directory as metadata.json records it and relative paths start: "rejected/"."""
    return f"{name}/"


def in_folder(relative: str, *names: str) -> bool:
    """Whether a path relative to the data directory lies in one of the folders `names`."""
    return relative.startswith(tuple(folder(n) for n in names))
