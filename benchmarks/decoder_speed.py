"""The two decoder families side by side, in one run: the train step's real tokens/s and MFU, and
decoding latency, greedy and beam 3, for one image and for a batch of 32.

    python -m benchmarks.decoder_speed [--length 24] [--steps 10] [--rounds 3] [--max-length 16]

Training: trainer.steps.CaptionSteps at the tutorial's shapes (batch 64, vocabulary 5,001,
embedding 256, width 512, features [64, 2048]; the Transformer at its defaults: 2 blocks, 2
heads, feed-forward 1,024) on the tutorial benchmark's synthetic batches, the GRU with the fused
attention kernels where they build (what the trainer uses), alternated over rounds; medians.
MFU: each step's matmul arithmetic (benchmarks.train_throughput's step_flops and
transformer_step_flops) against this machine's measured float32 matmul rate. Target: the
Transformer's real tokens/s >= 1.5x the GRU's.

Decoding: model.decoding.decode from features, as the export's caption_features signature runs
it (one tf.function, beam size and max length as inputs), on models with random weights: every
caption is made --max-length tokens long (min_length bans <end> until then), so both families
decode the same number of steps. The image encoder, the same for both, is left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.train_throughput import BATCH, EMBED, FEAT, POS, UNITS, VOCAB, matmul_peak, ours

DECODERS = ("gru", "transformer")


def training(length: int, steps: int, warmup: int, rounds: int, peak: float) -> dict:
    runs = {d: [] for d in DECODERS}
    for _ in range(rounds):
        for d in DECODERS:
            runs[d].append(ours(length, steps, warmup, mixed=False, jit=False, decoder=d))
    out = {}
    for d, rs in runs.items():
        real = statistics.median(r["real_tokens_per_s"] for r in rs)
        flops = statistics.median(r["flops_per_s"] for r in rs)
        out[d] = {"real_tokens_per_s": real, "mfu": flops / peak,
                  "flops_per_real_token": rs[-1]["flops_per_real_token"], "fused_attention": rs[-1]["fused_attention"],
                  "rounds": [r["real_tokens_per_s"] for r in rs]}
    out["transformer_over_gru"] = statistics.median(
        t["real_tokens_per_s"] / g["real_tokens_per_s"] for t, g in zip(runs["transformer"], runs["gru"]))
    return out


def decoding_latency(decoder: str, max_length: int, repeats: int) -> dict:
    """Median seconds of greedy and beam-3 decoding for 1 and 32 images."""
    import keras
    import tensorflow as tf

    from model import Captioner, CaptionerConfig, decoding

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = Captioner(CaptionerConfig(vocab_size=VOCAB, embedding_dim=EMBED, units=UNITS, decoder=decoder),
                      rng.normal(0, 1, FEAT).astype(np.float32), rng.uniform(0.5, 2, FEAT).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, POS, FEAT], tf.float16), tf.TensorSpec([], tf.int32),
                                  tf.TensorSpec([], tf.int32)])
    def captions(features, beam_size, max_len):
        out = decoding.decode(model, features, max_len, beam_size, min_length=max_len - 1)
        return out.tokens, out.lengths

    times = {}
    for batch in (1, 32):
        features = tf.constant(np.abs(rng.standard_normal((batch, POS, FEAT))), tf.float16)
        for k in (1, 3):
            args = (features, tf.constant(k), tf.constant(max_length))
            tokens, lengths = captions(*args)          # warm-up (the first call traces)
            assert int(tf.reduce_min(lengths)) == max_length, lengths
            spent = []
            for _ in range(repeats):
                t = time.perf_counter()
                captions(*args)[0].numpy()
                spent.append(time.perf_counter() - t)
            times[f"{'greedy' if k == 1 else 'beam3'}_batch{batch}_s"] = statistics.median(spent)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=24, help="padded caption length of the synthetic batches")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=16, help="tokens every decoded caption is made to have")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    peak = matmul_peak()
    print(f"float32 matmul peak on this machine: {peak / 1e9:,.1f} GFLOP/s", flush=True)
    train = training(args.length, args.steps, args.warmup, args.rounds, peak)
    for d in DECODERS:
        t = train[d]
        print(f"train step, {d}: {t['real_tokens_per_s']:,.0f} real tokens/s, "
              f"{t['flops_per_real_token'] / 1e6:.1f} MFLOP/real token, MFU {100 * t['mfu']:.1f}%"
              + (" (fused attention kernels)" if t["fused_attention"] else ""), flush=True)
    print(f"transformer / gru: {train['transformer_over_gru']:.2f}x (target 1.5x)", flush=True)
    latency = {d: decoding_latency(d, args.max_length, args.repeats) for d in DECODERS}
    for d, times in latency.items():
        print(f"decoding {args.max_length} tokens, {d}: " + ", ".join(
            f"{k[:-2].replace('_', ' ')} {1000 * v:,.0f} ms" for k, v in times.items()), flush=True)
    print("RESULT " + json.dumps({"matmul_gflops": peak / 1e9, "train": train, "latency": latency,
                                  "length": args.length, "batch": BATCH, "max_length": args.max_length}))


if __name__ == "__main__":
    main()
