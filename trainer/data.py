"""The trainer's view of a data directory: its metadata, and tf.data pipelines
that stream the shards (local or gs://) as caption batches.

One record holds an image and all its captions, so parsing decodes each
feature map once; the batch is then expanded to one row per caption, so an
epoch visits every caption once.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

from caption_io import fileio, records
from caption_io import vocab as vocab_lib

METADATA_FILE = records.METADATA_FILE


class DataError(ValueError):
    """A data directory the trainer cannot use (one readable line)."""


def load_metadata(data_dir: str) -> dict:
    path = fileio.join(data_dir, METADATA_FILE)
    if not fileio.exists(path):
        raise DataError(f"--data {data_dir}: no metadata.json (make a data directory with "
                        "`python -m pipelines.preprocess`)")
    try:
        meta = fileio.read_json(path)
        meta["features"]["shape"], meta["vocab"]["size"], meta["splits"]["train"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"--data {data_dir}: metadata.json is unreadable or incomplete ({e})") from None
    return meta


def load_vocab(data_dir: str, meta: dict) -> list[str]:
    tokens = vocab_lib.read(fileio.join(data_dir, meta["vocab"]["file"]))
    if len(tokens) != meta["vocab"]["size"]:
        raise DataError(f"--data {data_dir}: vocab.txt has {len(tokens)} tokens, metadata.json says {meta['vocab']['size']}")
    return tokens


def load_feature_stats(data_dir: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(fileio.read_bytes(fileio.join(data_dir, meta["features"]["stats_file"])))) as z:
        return z["mean"].astype(np.float32), z["std"].astype(np.float32)


def shard_files(data_dir: str, split: str, meta: dict | None = None) -> list[str]:
    """A split's shard files. Given the metadata, exactly the shards it lists, each
    checked to be there at the size it was written at (a truncated copy or a cut-short
    write fails here, naming the file, rather than mid-epoch); else those the glob finds."""
    from pipelines import validate

    listed = validate.listed_shards(data_dir, meta, split) if meta is not None else None
    if listed is not None:
        problems = validate.check_sizes(data_dir, meta, split)
        if problems:
            more = f" (and {len(problems) - 1} more: `python -m pipelines.validate {data_dir}`)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        return [f["path"] for f in listed]
    files = sorted(tf.io.gfile.glob(records.shard_glob(data_dir, split)))
    if not files:
        raise DataError(f"--data {data_dir}: no {split} shards ({records.shard_glob(data_dir, split)})")
    return files


def check_shards(files: list[str], feature_shape) -> None:
    """Parse the first record of the first shard, so a data directory whose
    shards are not this format fails before training starts."""
    try:
        first = next(iter(tf.data.TFRecordDataset(files[:1]).take(1)))
        records.parse_examples(tf.reshape(first, [1]), feature_shape)
    except StopIteration:
        return  # an empty shard: nothing to check
    except (tf.errors.OpError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:200]
        raise DataError(f"{files[0]}: not a captioner TFRecord shard ({msg})") from None


# Default buckets for a compiled (XLA) step: fine where COCO's captions are (10-16 tokens), coarse beyond.
_JIT_BUCKETS = (10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128)


def jit_buckets(given: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """Bucket boundaries for padding every caption up to a fixed length, so an XLA
    step sees a few shapes: `given` (or the defaults) up to the longest caption,
    and one more boundary above it, since padding to a boundary needs every
    caption shorter than the largest."""
    kept = [b for b in (given or _JIT_BUCKETS) if b <= max_tokens]
    return tuple(kept) + (max_tokens + 1,)


def caption_dataset(files: list[str], batch_size: int, *, feature_shape=records.FEATURE_SHAPE,
                    shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 1024,
                    bucket_boundaries: tuple[int, ...] = (), input_context: tf.distribute.InputContext | None = None,
                    read_batch: int = 32, prefetch: int = 4, pad_to_bucket: bool = False) -> tf.data.Dataset:
    """(features [B, 64, 2048] float16, tokens [B, T] int32) batches, T = the
    longest caption in the batch (tokens include <start> and <end>), or with
    pad_to_bucket the bucket's longest (boundary - 1), for compiled steps.

    Deterministic for a given seed: file order, interleave and shuffle are all
    seeded, so a run can be repeated and an epoch can be resumed by skipping
    the batches already trained on.
    """
    files = list(files)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context and input_context.num_input_pipelines > 1:
        # Each worker reads its own files when there are enough, else its own records.
        if len(files) >= input_context.num_input_pipelines:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    cycle = min(len(files), 8)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=cycle, num_parallel_calls=cycle,
                       deterministic=True)
    if input_context and input_context.num_input_pipelines > 1 and len(files) < input_context.num_input_pipelines:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)

    def expand(serialized):
        p = records.parse_examples(serialized, feature_shape)
        per_image = p["captions"].row_lengths()  # captions per image
        # Features are decoded once per image and repeated per caption here.
        feats = tf.repeat(p["features"], per_image, axis=0)
        captions = p["captions"].values  # [captions, (tokens)]
        return tf.data.Dataset.from_tensor_slices((feats, captions.to_tensor(), captions.row_lengths()))

    # Each caption keeps its own length, so a batch is padded to its own longest.
    ds = ds.batch(read_batch).flat_map(expand).map(lambda f, t, n: (f, t[:n]))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if bucket_boundaries:
        boundaries = list(bucket_boundaries)
        ds = ds.bucket_by_sequence_length(
            lambda f, t: tf.shape(t)[0], boundaries, [batch_size] * (len(boundaries) + 1),
            pad_to_bucket_boundary=pad_to_bucket)
    elif pad_to_bucket:
        raise ValueError("pad_to_bucket needs bucket_boundaries")
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=([*feature_shape], [None]))  # pads to the batch's longest
    # Fixed parallelism and prefetch depth, with tf.data's autotuning off. With it on, deleting
    # an epoch's iterator blocked until the autotuner thread's next wake-up, whose interval
    # doubles as the iterator ages: on `make demo`, epochs that ended just after 41 s waited
    # until 82 s (2,195 instead of ~4,300 tokens/s for the epoch). The knobs it tuned here
    # are the interleave's parallelism and the prefetch depth: a few batches ahead suffice.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(prefetch).with_options(options)


def count_captions(meta: dict, split: str) -> int:
    return int(meta["splits"][split]["captions"]["written"])
