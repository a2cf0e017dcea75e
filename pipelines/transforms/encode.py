"""The second pass: each shard's images through the encoder into its file.

The checked entries (small: ids, paths, captions) are grouped by the shard
assigned before the run (pipelines.shards.assign); one DoFn call then reads,
encodes and writes that shard's images batch by batch, streaming. Nothing
image-sized crosses a grouping, so Beam's DirectRunner, which holds whatever
crosses a grouping in memory, holds only the entries. On Dataflow the shards
are encoded in parallel, one per worker thread, and each pixel goes through
the encoder once.
"""
from __future__ import annotations

import collections
import logging
import time
from concurrent import futures

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from caption_io import datadir, fileio, records
from pipelines import shards
from pipelines.transforms import NAMESPACE, check, stats

log = logging.getLogger("pipelines.preprocess")


class _LoadedEncoder:
    """The encoder and its compiled call, shared by all threads of a worker process: float32
    features, computed in `compute` (model/precision.py: float32 or bfloat16)."""

    def __init__(self, backbone, weights_path, compute: str):
        import tensorflow as tf

        from model import precision

        self.model = backbone.load(weights_path)
        if compute != precision.FLOAT32:
            precision.set_compute(self.model, compute)
        size = backbone.geometry.input_size
        # One trace for every batch size: the input signature leaves it open.
        self.call = tf.function(lambda x: precision.encode(self.model, x), reduce_retracing=True,
                                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


def _load(entry, prepare):
    """(entry, the encoder's input [size, size, 3]) or (entry, reason)."""
    pixels, reason = check.read_pixels(entry)
    if reason is not None:  # the file changed since CheckImage read it
        return entry, reason
    # Resized per image (sizes differ), so the encoder gets uniform batches.
    return entry, prepare(pixels[None]).numpy()[0]


def _loaded(entries, prepare, threads: int, depth: int):
    """_load over entries in order, `threads` at a time, at most `depth` ahead:
    file reads (slow on gs://) overlap the encoder without a shard's worth of
    pixels piling up."""
    with futures.ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        it = iter(entries)
        while True:
            while len(pending) < depth:
                entry = next(it, None)
                if entry is None:
                    break
                pending.append(pool.submit(_load, entry, prepare))
            if not pending:
                return
            yield pending.popleft().result()


def _key(entry) -> tuple:
    return entry["image_id"], entry["file_name"]


class EncodeShard(beam.DoFn):
    """((split, index), entries) + vocabulary -> the shard file, then one summary
    {split, name, records, bytes, sha256, images, captions, max_tokens, stats}
    (stats: the ChannelStats accumulator, as JSON) and its rejects (tagged).

    A shard whose record in shards/ says it was finished from the same inputs
    (and encoder precision) is kept as it is: a rerun after a crash redoes only unfinished shards.
    """

    def __init__(self, output: str, shard_counts: dict, tokenizer: str, encoder: str, encoder_path: str,
                 encoder_sha256: str, shared_handle, batch_size: int, total_images: int, read_threads: int = 4,
                 precision: str = "float32"):
        self._output = output
        self._counts = dict(shard_counts)
        self._tokenizer = tokenizer  # the vocabulary's mode (caption_io.tokenizer)
        self._encoder_name = encoder  # the backbone (model.backbones)
        self._encoder_path = encoder_path
        self._encoder_sha256 = encoder_sha256
        self._shared = shared_handle
        self._batch_size = batch_size
        self._total = total_images  # images in the whole run, for the progress line
        self._threads = read_threads
        self._precision = precision

    def setup(self):
        from model import backbones

        backbone, path, compute = backbones.get(self._encoder_name), self._encoder_path, self._precision
        self._encoder = self._shared.acquire(lambda: _LoadedEncoder(backbone, path, compute))
        self._prepare = backbone.prepare
        self._feature_shape = backbone.geometry.feature_shape
        self._count = 0
        self._start = self._last_log = time.time()
        self._caption_ids, self._tokens_id = None, None

    def _progress(self, n):
        Metrics.counter(NAMESPACE, "images_encoded").inc(n)
        self._count += n
        now = time.time()
        if now - self._last_log > 15:  # a line a user can follow on a long local run
            self._last_log = now
            log.info("encoded %d of %d images in this worker (%.1f images/s)", self._count, self._total,
                     self._count / (now - self._start))

    def process(self, element, tokens):
        (split, index), values = element
        entries = sorted((e for e in values if e is not None), key=lambda e: (e["image_id"], e["file_name"]))
        name = datadir.shard_name(split, index, self._counts[split])
        fingerprint = shards.fingerprint(entries, tokens, self._tokenizer, self._encoder_sha256, self._precision)
        done = shards.read_done(self._output, name, fingerprint)
        if done is not None:
            Metrics.counter(NAMESPACE, "shards_kept").inc()
            log.info("%s: kept, finished by an earlier run from the same inputs", name)
        else:
            done = dict(self._write(split, name, entries, tokens), fingerprint=fingerprint)
            shards.write_done(self._output, name, done)
        for reject in done["rejected"]:
            yield beam.pvalue.TaggedOutput("rejected", reject)
        yield {k: v for k, v in done.items() if k not in ("rejected", "fingerprint")}

    def _write(self, split, name, entries, tokens) -> dict:
        if self._tokens_id != id(tokens):  # the side input is one list; build its encoder once
            from caption_io import tokenizer

            self._caption_ids = tokenizer.Encoder(tokens, self._tokenizer)
            self._tokens_id = id(tokens)
        # The shard's captions as token ids, in one call: {entry's key: [ids per caption]}.
        flat = iter(self._caption_ids([c["words"] for e in entries for c in e["captions"]]))
        ids = {_key(e): [next(flat) for _ in e["captions"]] for e in entries}
        acc, rejected = stats.ChannelStats().create_accumulator(), []
        writer = shards.ShardWriter(fileio.join(self._output, name))
        try:
            batch = []
            for entry, pixels in _loaded(entries, self._prepare, self._threads, 2 * self._batch_size):
                if isinstance(pixels, str):
                    rejected.append(check.image_reject(entry, pixels))
                    continue
                batch.append((entry, pixels))
                if len(batch) == self._batch_size:
                    acc = self._encode_batch(batch, ids, writer, acc, split)
                    batch = []
            if batch:
                acc = self._encode_batch(batch, ids, writer, acc, split)
            summary = writer.commit()
        except BaseException:
            writer.abort()
            raise
        lost = {r["input"]["image_id"] for r in rejected}
        written = [e for e in entries if e["image_id"] not in lost]
        images = len(written)
        captions = sum(len(e["captions"]) for e in written)
        longest = max((len(i) for e in written for i in ids[_key(e)]), default=0)
        Metrics.counter(NAMESPACE, "images_written").inc(images)
        Metrics.counter(NAMESPACE, "captions_written").inc(captions)
        return dict(summary, split=split, images=images, captions=captions, max_tokens=longest,
                    stats=stats.to_json(acc), rejected=rejected)

    def _encode_batch(self, batch, ids, writer, acc, split):
        features = self._encoder.call(np.stack([p for _, p in batch])).numpy().astype(records.FEATURE_DTYPE)
        for (entry, _), f in zip(batch, features):
            writer.write(records.make_example(entry["image_id"], entry["file_name"], f, ids[_key(entry)],
                                              [c["text"] for c in entry["captions"]], self._feature_shape))
        self._progress(len(batch))
        if split == "train":  # the model standardises with training statistics only
            acc = stats.ChannelStats().add_input(acc, features)
        return acc


class EncodeShards(beam.PTransform):
    """Checked entries, each with its "shard" -> {"shards": one summary per
    shard, "rejected": images that failed to load since they were checked}.

    Every shard of `shard_counts` is written, an empty file if no image is left
    for it, so a data directory always holds the shards its metadata names.
    """

    def __init__(self, output: str, shard_counts: dict, vocab, tokenizer: str, encoder: str, encoder_path: str,
                 encoder_sha256: str, batch_size: int, total_images: int, precision: str = "float32"):
        super().__init__()
        self._precision = precision
        self._output = output
        self._counts = dict(shard_counts)
        self._vocab = vocab
        self._tokenizer = tokenizer
        self._encoder = (encoder, encoder_path, encoder_sha256)
        self._batch_size = batch_size
        self._total = total_images

    def expand(self, entries):
        from apache_beam.utils import shared

        every_shard = entries.pipeline | "EveryShard" >> beam.Create(
            [((split, i), None) for split, n in sorted(self._counts.items()) for i in range(n)])
        keyed = entries | "KeyByShard" >> beam.Map(lambda e: ((e["split"], e["shard"]), e))
        grouped = (keyed, every_shard) | "WithEveryShard" >> beam.Flatten() | "GroupByShard" >> beam.GroupByKey()
        out = grouped | "Encode" >> beam.ParDo(
            EncodeShard(self._output, self._counts, self._tokenizer, *self._encoder, shared.Shared(),
                        self._batch_size, self._total, precision=self._precision),
            beam.pvalue.AsSingleton(self._vocab)).with_outputs("rejected", main="shards")
        return {"shards": out.shards, "rejected": out.rejected}
