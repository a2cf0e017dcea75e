"""The trainer's input pipeline over real shards."""
from __future__ import annotations

import collections
import glob
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from caption_io import geometry, metadata, records
from trainer import data


def _all(ds):
    return [(f.numpy(), t.numpy()) for f, t in ds]


def test_one_epoch_visits_every_caption_once_with_its_image(small_data):
    files = metadata.shard_files(small_data, "train")
    recs = records.read_records(files)
    want = collections.Counter(tuple(c) for r in recs for c in r["captions"])
    # Scenes repeat, so one caption text may belong to several images.
    images_of = collections.defaultdict(set)
    for r in recs:
        for c in r["captions"]:
            images_of[tuple(c)].add(r["features"].tobytes())
    got = collections.Counter()
    for f, t in _all(data.caption_dataset(files, 8, seed=3)):
        assert f.dtype == np.float16 and f.shape[1:] == (64, 2048)
        lengths = (t != 0).sum(1)
        assert t.shape[1] == lengths.max()  # padded to this batch's longest, no further
        for i in range(len(t)):
            cap = tuple(t[i, :lengths[i]])
            got[cap] += 1
            assert f[i].tobytes() in images_of[cap]  # the caption travels with its own image
    assert got == want


def test_seeded_order_repeats_and_seeds_differ(small_data):
    files = metadata.shard_files(small_data, "train")
    first = lambda seed: [t.tolist() for _, t in _all(data.caption_dataset(files, 4, seed=seed))]
    assert first(1) == first(1)
    assert first(1) != first(2)


def test_epoch_iterators_are_let_go_at_once_however_long_they_lived(small_data):
    # The trainer makes one iterator per epoch (through its strategy, as Trainer._dataset does)
    # and drops it when the epoch's batches end. Autotuned (the interleave's parallelism and the
    # prefetch depth), dropping one blocked until the autotuner's next wake-up, whose interval
    # doubles as the iterator ages (at ~2.6 s, the next is at ~5.1 s): epochs waited up to as long
    # again as they had run (see caption_dataset). Not every iterator hit it, so here are several,
    # each an epoch at a trainer's pace (~3 s); fixed knobs with autotuning off drop each at once.
    files = sorted(glob.glob(os.path.join(small_data, "train-*.tfrecord")))
    strategy = tf.distribute.get_strategy()
    for shuffle in (True, False):
        iterators = [iter(strategy.distribute_datasets_from_function(
            lambda ctx, k=k, shuffle=shuffle: data.caption_dataset(files, 2, shuffle=shuffle, seed=k,
                                                                   shuffle_buffer=16, input_context=ctx)))
                     for k in range(16)]
        start, live, batches = time.perf_counter(), list(iterators), 0
        while live:                                  # ~35 batches each, one from each in turn
            for it in list(live):
                try:
                    next(it)
                    batches += 1
                except StopIteration:
                    live.remove(it)
            time.sleep(0.07)
        lived = time.perf_counter() - start
        assert batches == 16 * 35 and lived > 2.5, (batches, lived)
        for i in range(len(iterators)):
            t = time.perf_counter()
            iterators.pop()
            let_go = time.perf_counter() - t
            assert let_go < 0.75, (f"shuffle={shuffle}: dropping an epoch's iterator that lived {lived:.1f} s took "
                                   f"{let_go:.2f} s (iterator {i + 1} of 16)")


def test_length_buckets(small_data):
    files = metadata.shard_files(small_data, "train")
    for _, t in _all(data.caption_dataset(files, 4, seed=0, bucket_boundaries=(14, 18))):
        lengths = (t != 0).sum(1)
        # Every caption in a batch falls in one bucket: [..14), [14..18), [18..)
        assert len({int(np.searchsorted([14, 18], n, side="right")) for n in lengths}) == 1


def test_input_context_splits_the_data(small_data):
    files = metadata.shard_files(small_data, "train")
    parts = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid, num_replicas_in_sync=2)
        parts.append(collections.Counter(tuple(row[row != 0]) for _, t in _all(
            data.caption_dataset(files, 4, seed=0, input_context=ctx)) for row in t))
    everything = collections.Counter(tuple(row[row != 0]) for _, t in _all(data.caption_dataset(files, 4, seed=0))
                                     for row in t)
    assert parts[0] + parts[1] == everything and parts[0] and parts[1]


def test_metadata_missing_is_a_clear_error(tmp_path):
    with pytest.raises(metadata.MetadataError, match="no metadata.json"):
        metadata.read(str(tmp_path))


def test_shards_that_do_not_parse_are_refused(tmp_path):
    bad = tmp_path / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(bad)) as w:
        w.write(tf.train.Example().SerializeToString())
    with pytest.raises(data.DataError, match="not a captioner TFRecord shard"):
        data.check_shards([str(bad)], geometry.DEFAULT.feature_shape)
    os.remove(bad)
    bad.write_bytes(b"definitely not a tfrecord file")
    with pytest.raises(data.DataError, match="not a captioner TFRecord shard"):
        data.check_shards([str(bad)], geometry.DEFAULT.feature_shape)


def test_padding_to_buckets_gives_a_few_fixed_lengths(small_data):
    meta = metadata.read(small_data)
    longest = max(info.max_tokens for info in meta.splits.values())
    buckets = data.jit_buckets((), longest)
    assert buckets[-1] == longest + 1 and list(buckets) == sorted(set(buckets))
    assert data.jit_buckets((8, 12, 99), 20) == (8, 12, 21)
    files = metadata.shard_files(small_data, "train")
    seen, captions = set(), 0
    for _, t in _all(data.caption_dataset(files, 4, seed=0, bucket_boundaries=buckets, pad_to_bucket=True)):
        width = t.shape[1]
        assert width + 1 in buckets, width  # padded to its bucket's longest
        i = buckets.index(width + 1)
        lengths = (t != 0).sum(1)
        assert ((lengths >= (buckets[i - 1] if i else 0)) & (lengths < width + 1)).all()  # in it, not cut
        seen.add(width)
        captions += len(t)
    assert len(seen) > 1 and captions == meta.splits["train"].captions.written
