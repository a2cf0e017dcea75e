"""Training throughput of the project's step next to the tutorial's loop, in one run.

    python -m benchmarks.train_throughput [--lengths 24,49] [--steps 10] [--data DATA_DIR]

At the tutorial's shapes (batch 64, vocab 5001, embedding 256, units 512,
features [64, 2048]) it times:
  - the tutorial's loop (../shared/bench/seed_reference.py), eager and under tf.function,
    each in its own subprocess;
  - this project's train step (trainer.steps.CaptionSteps, the one the trainer runs), with
    the fused CPU attention kernels the trainer uses here and, for comparison, with
    TensorFlow ops in their place (--attention-kernel ops);
and prints tokens/s and the ratios (targets: >= 6x eager, >= 2.5x compiled). It
also counts the step's matmul arithmetic (forward + backward, over the batch's images
and real tokens: step_flops) and puts the achieved rate against this machine's measured float32 matmul rate
(model-FLOPs utilisation, target >= 55%), and reports the tf.data rate from
real shards next to the step's consumption rate.

tokens/s = batch * (length - 1) * steps / s, the reference's definition
(padded positions cost the same compute).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
BATCH, VOCAB, EMBED, UNITS, POS, FEAT = 64, 5001, 256, 512, 64, 2048


def reference(length: int, steps: int, compiled: bool) -> dict:
    cmd = [sys.executable, os.path.join(BENCH, "seed_reference.py"), "--length", str(length), "--steps", str(steps)]
    if compiled:
        cmd.append("--compiled")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd)} printed no RESULT:\n{out.stderr[-2000:]}")


def step_flops(images: int, tokens: int, units=UNITS, embed=EMBED, vocab=VOCAB, pos=POS, feat=FEAT) -> float:
    """Matmul FLOPs of one training step (forward + backward) over `images` images and
    `tokens` real (non-pad) target tokens: the packed step computes nothing for padding.

    Backward costs twice the forward (input and weight gradients), except for the
    encoder's projection of the stored features: those are data, so it has a weight
    gradient only. Elementwise work (tanh, softmax, GRU gates) is not counted, as usual.
    """
    per_token = (units * 4 * units      # fused h matmul: attention query | GRU recurrent gates
                 + pos * units          # v . tanh(keys + query)
                 + pos * embed          # context = sum alpha f
                 + embed * 3 * units    # context -> GRU input gates
                 + embed * 3 * units    # word embedding -> GRU input gates
                 + units * units        # fc1
                 + units * vocab)       # fc2 (vocabulary projection)
    encoder = pos * feat * embed                       # features -> embedding (no input gradient)
    per_image = pos * embed * units + embed * units    # W1 f (attention keys), h0
    return 2 * (images * (2 * encoder + 3 * per_image) + tokens * 3 * per_token)


def transformer_step_flops(images: int, lengths, units=UNITS, embed=EMBED, vocab=VOCAB, pos=POS, feat=FEAT,
                           layers=2, ff=None) -> float:
    """Matmul FLOPs of one training step of the Transformer decoder (forward + backward) over
    `images` images and captions of `lengths` real target tokens each (the packed step's logits
    and loss are for real tokens only; its blocks run each caption up to the batch's longest, but
    only the real positions are counted, as step_flops does). Attention counts the keys a real
    position may see: the t words up to it and the grid's cells.
    """
    ff = ff or 2 * units
    lengths = [int(n) for n in lengths]
    tokens = sum(lengths)
    seen = sum(n * (n + 1) // 2 for n in lengths)        # sum over positions of the words it attends to
    block = 3 * units * units + units * units + units * units + units * units + 2 * units * ff
    per_token = layers * block + units * vocab            # blocks, then the vocabulary projection
    attention = layers * 2 * units * (seen + tokens * pos)  # q.k and weights.v, words and cells
    encoder = pos * feat * embed
    per_image = layers * pos * embed * 2 * units           # each block's keys and values of the cells
    return 2 * (images * (2 * encoder + 3 * per_image) + 3 * (tokens * per_token + attention))


def matmul_peak(dtype: str = "float32") -> float:
    """The machine's matmul rate in `dtype` (FLOP/s), best of a few shapes like the step's."""
    import tensorflow as tf

    best = 0.0
    for m, k, n in ((1536, 512, 5001), (4096, 512, 2048), (2048, 2048, 2048)):
        a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
        f = tf.function(lambda a, b: tf.matmul(a, b))
        f(a, b).numpy()
        reps, t = 10, time.perf_counter()
        for _ in range(reps):
            r = f(a, b)
        r.numpy()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def built_step(length: int, mixed: bool, jit: bool, attention_kernel: str = "auto", decoder: str = "gru"):
    """The project's train step at the tutorial's shapes, built, and 4 of the reference's own
    synthetic batches (same shapes and token statistics) -> (trainer.steps.CaptionSteps, batches)."""
    import tensorflow as tf

    sys.path.insert(0, BENCH)
    import common

    from model import CaptionerConfig
    from trainer.steps import CaptionSteps

    config = CaptionerConfig(vocab_size=VOCAB, embedding_dim=EMBED, units=UNITS, decoder=decoder,
                             compute_dtype="bfloat16" if mixed else "float32")
    s = CaptionSteps(config, np.zeros(FEAT, np.float32), np.ones(FEAT, np.float32), tf.distribute.get_strategy(),
                     1e-3, 5.0, jit_compile=jit, attention_kernel=attention_kernel)
    s.build((tf.TensorSpec([None, POS, FEAT], tf.float16), tf.TensorSpec([None, None], tf.int32)))
    return s, [(tf.constant(f, tf.float16), tf.constant(c)) for f, c in common.make_batches(4, BATCH, length)]


def ours(length: int, steps: int, warmup: int, mixed: bool, jit: bool, attention_kernel: str = "auto",
         decoder: str = "gru") -> dict:
    s, batches = built_step(length, mixed, jit, attention_kernel, decoder)
    config = s.config
    # Real (non-pad) target tokens a batch holds: the packed step computes only these.
    lengths = [np.count_nonzero(c.numpy()[:, 1:], axis=1) for _, c in batches]
    real = [int(n.sum()) for n in lengths]
    for i in range(warmup):
        float(s.train_step(batches[i % 4])["loss"])
    per = []
    t_all = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        float(s.train_step(batches[i % 4])["loss"])
        per.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t_all
    real_tokens = sum(real[i % 4] for i in range(steps))
    if decoder == "gru":
        flops = sum(step_flops(BATCH, real[i % 4]) for i in range(steps))
    else:
        flops = sum(transformer_step_flops(BATCH, lengths[i % 4], layers=config.layers,
                                           ff=config.ff_units) for i in range(steps))
    return {"tokens_per_s": BATCH * (length - 1) * steps / elapsed, "real_tokens_per_s": real_tokens / elapsed,
            "flops_per_s": flops / elapsed, "flops_per_real_token": flops / real_tokens,
            "sec_per_step_median": statistics.median(per), "traces": s.trace_count()[0],
            "fused_attention": s.fused_attention}


def input_rate(data_dir: str | None, batch: int) -> dict:
    """Captions/s that tf.data delivers from real shards (no model)."""
    from caption_io import metadata
    from trainer import data

    if data_dir is None:
        from pipelines import preprocess, synthetic

        work = tempfile.mkdtemp(prefix="bench-train-data-")
        synthetic.generate(os.path.join(work, "coco"), n_train=200, n_val=0, seed=0)
        data_dir = os.path.join(work, "data")
        preprocess.run(["--coco-dir", os.path.join(work, "coco"), "--output", data_dir,
                        "--encoder-weights", "random", "--num-shards", "4"])
    files = metadata.shard_files(data_dir, "train")
    n, t = 0, time.perf_counter()
    for _ in range(3):  # a few epochs, so start-up does not dominate
        for _features, tok in data.caption_dataset(files, batch, seed=0):
            n += int(tok.shape[0])
    return {"captions_per_s": n / (time.perf_counter() - t), "data": data_dir}


def _rounds(length: int, args) -> tuple[dict, dict]:
    """Ours and the tutorial's, alternated over a few rounds (the machine is shared and noisy:
    ratios from neighbouring runs hold). -> (each figure's list over the rounds, ours' last run)."""
    rounds = {k: [] for k in ("ours", "real", "flops", "ops", "eager", "compiled",
                              "bf16", "bf16_real", "bf16_flops", "bf16_ops")}
    run = dict(steps=args.steps, warmup=args.warmup, jit=False, decoder=args.decoder)
    for _ in range(args.rounds):
        o = ours(length, mixed=False, **run)
        if o["fused_attention"]:  # what the kernels add: the same step with TensorFlow ops
            rounds["ops"].append(ours(length, mixed=False, attention_kernel="ops", **run)["tokens_per_s"])
        rounds["ours"].append(o["tokens_per_s"])
        rounds["real"].append(o["real_tokens_per_s"])
        rounds["flops"].append(o["flops_per_s"])
        if args.mixed_precision:   # the bfloat16 step, with the kernels where they apply, and with the ops
            b = ours(length, mixed=True, **run)
            rounds["bf16"].append(b["tokens_per_s"])
            rounds["bf16_real"].append(b["real_tokens_per_s"])
            rounds["bf16_flops"].append(b["flops_per_s"])
            if b["fused_attention"]:
                rounds["bf16_ops"].append(ours(length, mixed=True, attention_kernel="ops", **run)["tokens_per_s"])
        if not args.skip_reference:
            rounds["compiled"].append(reference(length, args.steps, True)["tokens_per_s"])
            # Every round: the eager loop's rate moves with the machine as much as ours.
            rounds["eager"].append(reference(length, max(3, args.steps // 2), False)["tokens_per_s"])
    return rounds, o


def _row(length: int, rounds: dict, o: dict, peaks: dict, args) -> tuple[dict, str]:
    """One caption length's medians and ratios -> (its RESULT entry, its printed line)."""
    from model import fused_attention

    med = {k: statistics.median(v) for k, v in rounds.items() if v}
    row = {"ours": med["ours"], "ours_real_tokens_per_s": med["real"], "ours_traces": o["traces"],
           "attention": fused_attention.describe() if o["fused_attention"] else "TensorFlow ops",
           "attention_build": fused_attention.loaded_build() if o["fused_attention"] else None, "rounds": rounds}
    fpt = o["flops_per_real_token"]
    row["flops_per_real_token"] = fpt
    # The step packs captions by length and skips padding, so its arithmetic is counted on what
    # it computes: the batch's images and real tokens (counting padded positions would pass 100%).
    row["mfu"] = med["flops"] / peaks["float32"]
    line = f"length {length}: ours {row['ours']:,.0f} tokens/s ({med['real']:,.0f} real; attention: {row['attention']})"
    if "ops" in med:
        row["ours_tensorflow_ops"] = med["ops"]
        line += f" | with TensorFlow ops instead {med['ops']:,.0f} ({med['ours'] / med['ops']:.2f}x from the kernels)"
    if "eager" in med:
        row["tutorial_eager"], row["tutorial_compiled"] = med["eager"], med["compiled"]
        row["x_eager"] = statistics.median([o / e for o, e in zip(rounds["ours"], rounds["eager"])])
        row["x_compiled"] = statistics.median([o / c for o, c in zip(rounds["ours"], rounds["compiled"])])
        line += (f" | tutorial eager {med['eager']:,.0f} ({row['x_eager']:.2f}x, target 6x)"
                 f" | tutorial tf.function {med['compiled']:,.0f} ({row['x_compiled']:.2f}x, target 2.5x)")
    line += f" | {fpt / 1e6:.1f} MFLOP/real token, MFU {100 * row['mfu']:.1f}% (target 55%)"
    if "bf16" in med:
        row["ours_bf16"], row["ours_bf16_real_tokens_per_s"] = med["bf16"], med["bf16_real"]
        row["bf16_over_float32"] = statistics.median([b / f for b, f in zip(rounds["bf16_real"], rounds["real"])])
        row["mfu_bf16"] = med["bf16_flops"] / peaks["bfloat16"]   # against bfloat16's own matmul rate
        line += (f" | bfloat16 {med['bf16']:,.0f} tokens/s ({row['bf16_over_float32']:.2f}x float32's step, "
                 f"target 1.5x; MFU {100 * row['mfu_bf16']:.1f}% of the bfloat16 matmul rate)")
        if "bf16_ops" in med:
            row["ours_bf16_tensorflow_ops"] = med["bf16_ops"]
            line += (f" | bfloat16 with TensorFlow ops {med['bf16_ops']:,.0f} "
                     f"({med['bf16'] / med['bf16_ops']:.2f}x from the kernels)")
    return row, line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="24,49")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / tutorial; medians reported")
    ap.add_argument("--data", help="a data directory for the tf.data rate (default: build a small one)")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="also time the step in bfloat16 (with the fused kernels where they apply, and with the ops)")
    ap.add_argument("--decoder", default="gru", choices=("gru", "transformer"))
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    from model import fused_attention

    peaks = {dtype: matmul_peak(dtype) for dtype in ("float32",) + (("bfloat16",) if args.mixed_precision else ())}
    for dtype, peak in peaks.items():
        print(f"{dtype} matmul peak on this machine: {peak / 1e9:,.1f} GFLOP/s")
    try:
        print(f"train step's attention: {fused_attention.describe()}")
    except fused_attention.KernelError as e:
        print(f"train step's attention: TensorFlow ops ({e})")
    results = {"matmul_gflops": peaks["float32"] / 1e9, "decoder": args.decoder, "lengths": {},
               "matmul_gflops_by_dtype": {d: p / 1e9 for d, p in peaks.items()}}
    for length in [int(x) for x in args.lengths.split(",")]:
        rounds, o = _rounds(length, args)
        results["lengths"][length], line = _row(length, rounds, o, peaks, args)
        print(line, flush=True)
    rate = input_rate(args.data, BATCH)
    shortest = results["lengths"][min(results["lengths"])]
    step_rate = shortest["ours_real_tokens_per_s"] / 14.0  # the reference's captions: ~14 real targets each
    print(f"tf.data from shards: {rate['captions_per_s']:,.0f} captions/s; the step consumes ~{step_rate:,.0f} "
          f"captions/s: input/step = {rate['captions_per_s'] / step_rate:.1f}x")
    results["input_captions_per_s"] = rate["captions_per_s"]
    results["step_captions_per_s"] = step_rate
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
