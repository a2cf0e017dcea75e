"""What the decoding controls cost: decode time of one batch with them off and on.

    python -m benchmarks.decoding_controls [--batch 32] [--max-length 20] [--beam-sizes 1,3] [--repeats 5]

At the tutorial's model size (vocab 5001, embedding 256, units 512, features [64, 2048]),
seeded random weights, one batch of random features. Each variant is one tf.function traced
once with the inputs a SavedModel signature gives it (beam_size, max_length and the controls
as int32 scalar tensors), and times model.decoding.decode:
  plain   decode without the new arguments (what every caller ran before the controls);
  off     the controls passed as tensors at their defaults (num_captions 1,
          no_repeat_ngram 0, min_length 0): the path an exported signature with the
          controls takes when a request leaves them at their defaults;
  ngram3  no_repeat_ngram 3;
  all     no_repeat_ngram 3, min_length 5 and num_captions = the beam size.
Runs are interleaved so machine noise hits every variant alike; the ratios are of the
fastest run of each (on a shared machine the least disturbed one), medians beside. The random
weights rarely choose <end>, so most captions run to max_length and every variant does the
same number of steps (the mean caption length is printed to show it). Prints a table and a
RESULT line (JSON). Figures are measured, not asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

VOCAB, POSITIONS, CHANNELS = 5001, 64, 2048


def variants(beam_size: int) -> dict:
    """name -> (num_captions, no_repeat_ngram, min_length), None for the plain call."""
    return {"plain": None, "off": (1, 0, 0), "ngram3": (1, 3, 0), "all": (beam_size, 3, 5)}


def build(seed: int = 0):
    """The tutorial-sized captioner with seeded random weights, and the two traced decoders."""
    import keras
    import tensorflow as tf

    from model import Captioner, CaptionerConfig, decoding

    keras.utils.set_random_seed(seed)
    model = Captioner(CaptionerConfig(vocab_size=VOCAB, dropout=0.0))
    scalar = tf.TensorSpec([], tf.int32)
    features = tf.TensorSpec([None, POSITIONS, CHANNELS], tf.float32)

    @tf.function(input_signature=[features, scalar, scalar])
    def plain(f, beam_size, max_length):
        return decoding.decode(model, f, max_length, beam_size)

    @tf.function(input_signature=[features, scalar, scalar, scalar, scalar, scalar])
    def controlled(f, beam_size, max_length, num_captions, no_repeat_ngram, min_length):
        return decoding.decode(model, f, max_length, beam_size, num_captions=num_captions,
                               no_repeat_ngram=no_repeat_ngram, min_length=min_length)
    return plain, controlled


def measure(batch: int, max_length: int, beam_sizes: list[int], repeats: int) -> dict:
    import tensorflow as tf

    plain, controlled = build()
    rng = np.random.default_rng(0)
    features = tf.constant(rng.standard_normal((batch, POSITIONS, CHANNELS)).astype(np.float32))
    result = {}
    for k in beam_sizes:
        calls = {}
        for name, controls in variants(k).items():
            args = (features, tf.constant(k), tf.constant(max_length))
            if controls is None:
                calls[name] = lambda args=args: plain(*args)
            else:
                extra = tuple(tf.constant(v) for v in controls)
                calls[name] = lambda args=args, extra=extra: controlled(*args, *extra)
        lengths = {}
        for name, call in calls.items():  # warm-up: trace, allocations
            call()
            lengths[name] = float(np.mean(call().lengths.numpy()))
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call().tokens.numpy()
                times[name].append(time.perf_counter() - start)
        best = {name: min(v) for name, v in times.items()}
        result[f"beam{k}"] = {name: {"ms_min": round(1e3 * best[name], 1),
                                     "ms_median": round(1e3 * statistics.median(times[name]), 1),
                                     "vs_plain": round(best[name] / best["plain"], 3),
                                     "mean_length": round(lengths[name], 1)} for name in calls}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--beam-sizes", default="1,3")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    beam_sizes = [int(k) for k in a.beam_sizes.split(",")]
    result = measure(a.batch, a.max_length, beam_sizes, a.repeats)
    print(f"decode of a batch of {a.batch}, max_length {a.max_length}, {a.repeats} runs each")
    print(f"{'':8}{'variant':8}{'min ms':>10}{'median ms':>11}{'x plain':>10}{'mean length':>13}")
    for beam, rows in result.items():
        for name, row in rows.items():
            print(f"{beam:8}{name:8}{row['ms_min']:>10}{row['ms_median']:>11}{row['vs_plain']:>10}"
                  f"{row['mean_length']:>13}")
    print("RESULT " + json.dumps({"batch": a.batch, "max_length": a.max_length, "decode": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
