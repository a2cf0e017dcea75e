"""Latency of the exported SavedModel next to the bare InceptionV3 forward pass.

    python -m benchmarks.serving_latency --model JOB_DIR/export --image IMG.jpg [--repeats 20]

For one image: the encoder alone (its forward pass on the prepared 299x299
pixels, compiled), then the SavedModel from JPEG bytes to caption, greedy and
beam 3, interleaved so machine noise hits all alike; medians. Targets: caption
decoding adds at most 25% (greedy) and 60% (beam 3) to the encoder's time.
Also batched throughput (images/s at batch 32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an export directory")
    ap.add_argument("--image", required=True)
    ap.add_argument("--data", help="the data directory, for the encoder alone (default: the one export.json records)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=30)
    args = ap.parse_args()

    from caption_io import images, jobdir
    from caption_io.savedmodel import EXPORT_INFO
    from caption_serving.client import ModelError, load_model, option_inputs
    from model import backbones

    try:
        loaded, info = load_model(args.model)
        data_dir = args.data or jobdir.recorded_data(info, os.path.join(args.model, EXPORT_INFO), args.model)
        backbone = backbones.of_encoder(info["encoder"])
        encoder = backbone.load(os.path.join(data_dir, info["encoder"]["file"]))
    except (ModelError, jobdir.RecordedPathError, backbones.EncoderWeightsError) as e:
        sys.exit(f"error: {e}")
    forward = tf.function(lambda x: encoder(x, training=False))
    blob = open(args.image, "rb").read()
    pixels = backbone.prepare(images.decode(blob)[None])
    sig = loaded.signatures["caption_images"]
    one = tf.constant([blob])

    runs = {"encoder": lambda: forward(pixels).numpy(),
            "greedy": lambda: sig(images=one, **option_inputs(1, args.max_length))["captions"].numpy(),
            "beam3": lambda: sig(images=one, **option_inputs(3, args.max_length))["captions"].numpy()}
    for fn in runs.values():  # warm up: traces, allocations
        fn()
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k] += _time(fn, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    caption = sig(images=one, **option_inputs(1, args.max_length))
    words = int(caption["lengths"].numpy()[0])

    batch = tf.constant([blob] * 32)
    sig(images=batch, **option_inputs(1, args.max_length))
    t = time.perf_counter()
    sig(images=batch, **option_inputs(1, args.max_length))["captions"].numpy()
    greedy_32 = 32 / (time.perf_counter() - t)
    t = time.perf_counter()
    sig(images=batch, **option_inputs(3, args.max_length))["captions"].numpy()
    beam_32 = 32 / (time.perf_counter() - t)

    g = med["greedy"] / med["encoder"] - 1
    b = med["beam3"] / med["encoder"] - 1
    print(f"one image ({words} tokens generated): encoder forward {1000 * med['encoder']:.1f} ms | "
          f"SavedModel greedy {1000 * med['greedy']:.1f} ms (+{100 * g:.0f}%, target <= 25%) | "
          f"beam 3 {1000 * med['beam3']:.1f} ms (+{100 * b:.0f}%, target <= 60%)")
    print(f"batch 32: greedy {greedy_32:.1f} images/s, beam 3 {beam_32:.1f} images/s")
    print("RESULT " + json.dumps({"encoder_ms": 1000 * med["encoder"], "greedy_ms": 1000 * med["greedy"],
                                  "beam3_ms": 1000 * med["beam3"], "greedy_overhead": g, "beam3_overhead": b,
                                  "tokens": words, "batch32_greedy_images_per_s": greedy_32,
                                  "batch32_beam3_images_per_s": beam_32,
                                  "spread_ms": {k: [1000 * min(v), 1000 * max(v)] for k, v in times.items()}}))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
