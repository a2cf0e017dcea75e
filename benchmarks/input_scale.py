"""The trainer's input side at COCO size, by simulation.

    python -m benchmarks.input_scale [--images 30000] [--shards 64] [--workdir DIR] [--keep]

Writes a train split of N images through the pipeline's own record writer
(records.make_example framed by shards.ShardWriter; no encoder: the features
are random float16 [64, 2048]) with COCO-like captions (5 an image, 8-20 words,
Zipf-distributed ids over a 5,000-word vocabulary), then streams one full epoch
through trainer.data.caption_dataset with the trainer's defaults (batch 64,
shuffled). Prints the resident set size over the epoch (it must stay flat), the
records/s and captions/s delivered, and the ratio to what the train step
(trainer.steps.CaptionSteps, this machine) consumes (target >= 5x).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from caption_io import geometry

VOCAB_WORDS = 5000
CAPTIONS_PER_IMAGE = 5
FEATURE_SHAPE = geometry.DEFAULT.feature_shape  # the default encoder's, InceptionV3's


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_split(data_dir: str, images: int, n_shards: int, seed: int = 0) -> dict:
    from caption_io import datadir, records
    from caption_io import vocab as vocab_lib
    from pipelines import shards

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(VOCAB_WORDS)]
    tokens = list(vocab_lib.SPECIALS) + words
    # Zipf-like word frequencies, as in real captions: a few words ("a", "on", "of") dominate.
    p = 1.0 / np.arange(1, VOCAB_WORDS + 1)
    p /= p.sum()
    entries = [{"image_id": 1_000_000 + i, "file_name": f"sim_{i:07d}.jpg"} for i in range(images)]
    shards.assign(entries, n_shards)
    writers = {}
    t = time.perf_counter()
    for e in entries:
        k = e["shard"]
        if k not in writers:
            writers[k] = shards.ShardWriter(os.path.join(data_dir, datadir.shard_name("train", k, n_shards)))
        features = rng.standard_normal(FEATURE_SHAPE, dtype=np.float32).astype(np.float16)
        lengths = rng.integers(8, 21, CAPTIONS_PER_IMAGE)
        ids = [(rng.choice(VOCAB_WORDS, n, p=p) + len(vocab_lib.SPECIALS)).tolist() for n in lengths]
        texts = [" ".join(tokens[i] for i in c) for c in ids]
        writers[k].write(records.make_example(e["image_id"], e["file_name"], features,
                                              [[vocab_lib.START_ID, *c, vocab_lib.END_ID] for c in ids], texts,
                                              FEATURE_SHAPE))
    files = [w.commit() for _, w in sorted(writers.items())]
    return {"seconds": time.perf_counter() - t, "bytes": sum(f["bytes"] for f in files), "vocab": len(tokens),
            "files": [os.path.join(data_dir, f["name"]) for f in files]}


def stream_epoch(files: list[str], batch: int) -> dict:
    from trainer import data
    from trainer.settings import Settings

    ds = data.caption_dataset(files, batch, feature_shape=FEATURE_SHAPE, shuffle=True, seed=0,
                              shuffle_buffer=Settings.shuffle_buffer,
                              bucket_boundaries=Settings.bucket_boundaries)
    samples, captions, t = [], 0, time.perf_counter()
    for i, (_, tok) in enumerate(ds):
        captions += int(tok.shape[0])
        if i % 200 == 0:
            samples.append((captions, round(rss_mb(), 1)))
    seconds = time.perf_counter() - t
    samples.append((captions, round(rss_mb(), 1)))
    return {"captions": captions, "seconds": seconds, "rss_samples": samples}


def step_rate(files: list[str], vocab: int, batch: int, steps: int = 8, warmup: int = 3) -> float:
    """Captions/s the trainer's step consumes at these shapes, on batches from the shards."""
    import tensorflow as tf

    from model import CaptionerConfig
    from trainer import data
    from trainer.steps import CaptionSteps

    config = CaptionerConfig(vocab_size=vocab)
    s = CaptionSteps(config, np.zeros(2048, np.float32), np.ones(2048, np.float32), tf.distribute.get_strategy(),
                     1e-3, 5.0)
    s.build((tf.TensorSpec([None, 64, 2048], tf.float16), tf.TensorSpec([None, None], tf.int32)))
    batches = list(data.caption_dataset(files[:1], batch, feature_shape=FEATURE_SHAPE,
                                        shuffle=False).take(steps + warmup))
    for b in batches[:warmup]:
        float(s.train_step(b)["loss"])
    t = time.perf_counter()
    for b in batches[warmup:]:
        float(s.train_step(b)["loss"])
    return sum(int(b[1].shape[0]) for b in batches[warmup:]) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=30_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the simulated shards")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-input-")
    data_dir = os.path.join(work, f"sim-{args.images}")
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    try:
        w = write_split(data_dir, args.images, args.shards)
        print(f"wrote {args.images:,} images in {args.shards} shards: "
              f"{w['bytes'] / 1e9:.2f} GB in {w['seconds']:.0f} s "
              f"({args.images / w['seconds']:,.0f} records/s)", flush=True)
        rss_before = rss_mb()
        e = stream_epoch(w["files"], args.batch_size)
        consumed = step_rate(w["files"], w["vocab"], args.batch_size)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    samples = e["rss_samples"]
    after_first = samples[min(1, len(samples) - 1)][1]
    peak = max(r for _, r in samples)
    captions_per_s = e["captions"] / e["seconds"]
    records_per_s = captions_per_s / CAPTIONS_PER_IMAGE
    print(f"one epoch: {e['captions']:,} captions ({args.images:,} records) in {e['seconds']:.0f} s: "
          f"{records_per_s:,.0f} records/s, {captions_per_s:,.0f} captions/s")
    print(f"RSS before the epoch {rss_before:,.0f} MB; after the first 200 batches {after_first:,.0f} MB; "
          f"peak {peak:,.0f} MB; at the end {samples[-1][1]:,.0f} MB "
          f"(growth over the epoch {peak - after_first:+,.0f} MB)")
    print(f"the train step consumes {consumed:,.0f} captions/s ({consumed / CAPTIONS_PER_IMAGE:,.0f} records/s): "
          f"input/step = {captions_per_s / consumed:.1f}x (target >= 5x)")
    print("RESULT " + json.dumps({
        "images": args.images, "shards": args.shards, "gigabytes": round(w["bytes"] / 1e9, 2),
        "write_records_per_s": round(args.images / w["seconds"], 1),
        "epoch_seconds": round(e["seconds"], 1), "records_per_s": round(records_per_s, 1),
        "captions_per_s": round(captions_per_s, 1), "rss_mb_after_first_200_batches": after_first,
        "rss_mb_peak": peak, "rss_mb_end": samples[-1][1], "step_captions_per_s": round(consumed, 1),
        "ratio_input_to_step": round(captions_per_s / consumed, 2), "rss_samples": samples}))


if __name__ == "__main__":
    main()
