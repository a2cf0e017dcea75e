"""The trainer's tf.data side of a data directory: pipelines that stream the shards
(local or gs://) as caption batches. Its metadata, vocabulary, feature statistics
and shard list come through caption_io.metadata.

One record holds an image and all its captions, so parsing decodes each
feature map once; the batch is then expanded to one row per caption, so an
epoch visits every caption once.
"""
from __future__ import annotations

import tensorflow as tf

from caption_io import cli, records


class DataError(ValueError, cli.UserError):
    """Shards the trainer cannot read (one readable line); what is wrong with the data
    directory as metadata.json describes it is a caption_io.metadata.MetadataError."""


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


def caption_dataset(files: list[str], batch_size: int, *, feature_shape=None,
                    shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 1024,
                    bucket_boundaries: tuple[int, ...] = (), input_context: tf.distribute.InputContext | None = None,
                    read_batch: int = 32, prefetch: int = 4, pad_to_bucket: bool = False) -> tf.data.Dataset:
    """(features [B, positions, channels] float16, tokens [B, T] int32) batches, T = the
    longest caption in the batch (tokens include <start> and <end>), or with
    pad_to_bucket the bucket's longest (boundary - 1), for compiled steps. feature_shape: the data
    directory's (None: read from the metadata.json beside the shards).

    Deterministic for a given seed: file order, interleave and shuffle are all
    seeded, so a run can be repeated and an epoch can be resumed by skipping
    the batches already trained on.
    """
    files = list(files)
    feature_shape = feature_shape or records.beside(files)
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
    # doubles as the iterator ages, so an epoch could take up to twice its time (figures in
    # docs/ARCHITECTURE.md). The knobs it tuned here
    # are the interleave's parallelism and the prefetch depth: a few batches ahead suffice.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(prefetch).with_options(options)
