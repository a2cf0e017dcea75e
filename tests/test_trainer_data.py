"""The trainer's input pipeline over real shards."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from caption_io import records
from trainer import data


def _all(ds):
    return [(f.numpy(), t.numpy()) for f, t in ds]


def test_one_epoch_visits_every_caption_once_with_its_image(small_data):
    files = data.shard_files(small_data, "train")
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
    files = data.shard_files(small_data, "train")
    first = lambda seed: [t.tolist() for _, t in _all(data.caption_dataset(files, 4, seed=seed))]  # noqa: E731
    assert first(1) == first(1)
    assert first(1) != first(2)


def test_epoch_datasets_are_not_autotuned(small_data):
    # An autotuned iterator's deletion waited for the autotuner's next wake-up, up to as long
    # again as the epoch (see caption_dataset): the trainer makes one iterator per epoch.
    for shuffle in (True, False):
        ds = data.caption_dataset(data.shard_files(small_data, "train"), 8, shuffle=shuffle)
        assert ds.options().autotune.enabled is False


def test_length_buckets(small_data):
    files = data.shard_files(small_data, "train")
    for _, t in _all(data.caption_dataset(files, 4, seed=0, bucket_boundaries=(14, 18))):
        lengths = (t != 0).sum(1)
        # Every caption in a batch falls in one bucket: [..14), [14..18), [18..)
        assert len({int(np.searchsorted([14, 18], n, side="right")) for n in lengths}) == 1


def test_input_context_splits_the_data(small_data):
    files = data.shard_files(small_data, "train")
    parts = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid, num_replicas_in_sync=2)
        parts.append(collections.Counter(tuple(row[row != 0]) for _, t in _all(
            data.caption_dataset(files, 4, seed=0, input_context=ctx)) for row in t))
    everything = collections.Counter(tuple(row[row != 0]) for _, t in _all(data.caption_dataset(files, 4, seed=0))
                                     for row in t)
    assert parts[0] + parts[1] == everything and parts[0] and parts[1]


def test_metadata_missing_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="no metadata.json"):
        data.load_metadata(str(tmp_path))


def test_shards_that_do_not_parse_are_refused(tmp_path):
    bad = tmp_path / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(bad)) as w:
        w.write(tf.train.Example().SerializeToString())
    with pytest.raises(data.DataError, match="not a captioner TFRecord shard"):
        data.check_shards([str(bad)], records.FEATURE_SHAPE)
    os.remove(bad)
    bad.write_bytes(b"definitely not a tfrecord file")
    with pytest.raises(data.DataError, match="not a captioner TFRecord shard"):
        data.check_shards([str(bad)], records.FEATURE_SHAPE)


def test_padding_to_buckets_gives_a_few_fixed_lengths(small_data):
    meta = data.load_metadata(small_data)
    longest = max(info["max_tokens"] for info in meta["splits"].values())
    buckets = data.jit_buckets((), longest)
    assert buckets[-1] == longest + 1 and list(buckets) == sorted(set(buckets))
    assert data.jit_buckets((8, 12, 99), 20) == (8, 12, 21)
    files = data.shard_files(small_data, "train")
    seen, captions = set(), 0
    for _, t in _all(data.caption_dataset(files, 4, seed=0, bucket_boundaries=buckets, pad_to_bucket=True)):
        width = t.shape[1]
        assert width + 1 in buckets, width  # padded to its bucket's longest
        i = buckets.index(width + 1)
        lengths = (t != 0).sum(1)
        assert ((lengths >= (buckets[i - 1] if i else 0)) & (lengths < width + 1)).all()  # in it, not cut
        seen.add(width)
        captions += len(t)
    assert len(seen) > 1 and captions == data.count_captions(meta, "train")
