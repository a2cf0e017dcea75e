"""The encoder and the train step on an accelerator, in one run (benchmarks/gpu.sh calls it).

    python -m benchmarks.gpu_throughput [--smoke]

Prints, each as a line and all together as one RESULT line:
  - the device's measured matmul rate, bfloat16 and float32 (TF32 where the GPU has it);
  - InceptionV3 (the pipeline's encoder) images/s at batch 64 and 256, float32 and mixed bfloat16;
  - the train step's real tokens/s at batch 64, 256 and 512, with the time loop as TensorFlow
    ops, with and without XLA (jit_compile), on COCO-like captions padded to the trainer's
    buckets (so XLA compiles once per bucket), and its model-FLOPs utilisation against the
    matmul rate of its compute dtype (targets: >= 40,000 real tokens/s, encoder >= 2,000 images/s
    in bfloat16, on one H200);
  - with two or more GPUs, the same step under a two-replica MirroredStrategy.

--smoke runs every code path at toy sizes, on whatever device there is (the test suite
runs it on CPU, so a GPU session does not find a typo).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

VOCAB = 5004          # 5,000 words + 4 specials, as preprocess's default
CAPTION_WORDS = (8, 20)  # COCO: about 10.5 words a caption, rarely fewer than 8


def _sync(x):
    return x.numpy() if hasattr(x, "numpy") else x


def matmul_rate(dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n product in `dtype`, compiled, after a warm-up."""
    import tensorflow as tf

    a = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    f = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
    _sync(f(a, b))
    t = time.perf_counter()
    for _ in range(reps):
        r = f(a, b)
    _sync(r)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def encoder_rate(batch: int, mixed: bool, iters: int) -> float:
    import keras
    import tensorflow as tf

    from model import backbones

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed else "float32")
    try:
        backbone = backbones.get(backbones.DEFAULT)
        model = backbone.build("random", seed=0)
        call = tf.function(lambda x: tf.cast(model(x, training=False), tf.float16), jit_compile=False)
        size = backbone.geometry.input_size
        x = tf.random.uniform([batch, size, size, 3], -1, 1)
        _sync(call(x))
        t = time.perf_counter()
        for _ in range(iters):
            y = call(x)
        _sync(y)
        return batch * iters / (time.perf_counter() - t)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def caption_batches(batch: int, buckets: tuple[int, ...], n: int, seed: int = 0):
    """n (features, tokens) batches of COCO-like lengths, each padded to its bucket's
    longest as the trainer's XLA input does; -> (batches, real target tokens per batch)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out, real = [], []
    for i in range(n):
        width = buckets[i % len(buckets)] - 1
        lo = buckets[i % len(buckets) - 1] if i % len(buckets) else 3
        lengths = rng.integers(max(lo, CAPTION_WORDS[0] + 2), width + 1, batch)
        tokens = np.zeros((batch, width), np.int32)
        for r, k in enumerate(lengths):
            tokens[r, :k] = [2, *rng.integers(4, VOCAB, k - 2), 3]
        features = tf.constant(rng.standard_normal((batch, 64, 2048), dtype=np.float32), tf.float16)
        out.append((features, tf.constant(tokens)))
        real.append(int((lengths - 1).sum()))
    return out, real


def step_rate(batch: int, jit: bool, mixed: bool, buckets, steps: int, strategy=None) -> dict:
    import tensorflow as tf

    from benchmarks.train_throughput import step_flops
    from model import CaptionerConfig
    from trainer.steps import CaptionSteps

    strategy = strategy or tf.distribute.get_strategy()
    config = CaptionerConfig(vocab_size=VOCAB, compute_dtype="bfloat16" if mixed else "float32")
    s = CaptionSteps(config, np.zeros(2048, np.float32), np.ones(2048, np.float32), strategy, 1e-3, 5.0,
                     jit_compile=jit, attention_kernel="ops")
    spec = (tf.TensorSpec([None, 64, 2048], tf.float16), tf.TensorSpec([None, None], tf.int32))
    batches, real = caption_batches(batch, buckets, len(buckets))
    if strategy.num_replicas_in_sync > 1:
        # Each batch split over the replicas as the trainer's distributed dataset splits it;
        # one bucket, so the distributed signature holds one shape.
        batches, real = batches[:1], real[:1]
        dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(batches[0]).batch(batch))
        spec, batches = dist.element_spec, [next(iter(dist))]
    s.build(spec)
    t = time.perf_counter()
    for b in batches:  # compile every bucket's shape (XLA) before timing
        float(s.train_step(b)["loss"])
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    tokens = flops = 0
    for i in range(steps):
        out = s.train_step(batches[i % len(batches)])
        tokens += real[i % len(batches)]
        flops += step_flops(batch, real[i % len(batches)], vocab=VOCAB)
    float(out["loss"])
    seconds = time.perf_counter() - t
    return {"real_tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds, "warmup_s": compile_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, any device: check that every path runs")
    args = ap.parse_args(argv)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    print(f"devices: {', '.join(names) if names else 'CPU only'}; TensorFlow {tf.__version__}", flush=True)
    smoke = args.smoke
    result = {"devices": names, "smoke": smoke}

    n, reps = (256, 2) if smoke else (8192, 20)
    peak = {"bfloat16": matmul_rate(tf.bfloat16, n, reps), "float32": matmul_rate(tf.float32, n, reps)}
    result["matmul_tflops"] = {k: v / 1e12 for k, v in peak.items()}
    print(f"matmul {n}^3: bfloat16 {peak['bfloat16'] / 1e12:.1f} TFLOP/s, float32 (TF32 where the GPU has it) "
          f"{peak['float32'] / 1e12:.1f} TFLOP/s", flush=True)

    result["encoder_images_per_s"] = {}
    for batch in ((2,) if smoke else (64, 256)):
        for mixed in (False, True):
            rate = encoder_rate(batch, mixed, 1 if smoke else 20)
            key = f"batch{batch}_{'bfloat16' if mixed else 'float32'}"
            result["encoder_images_per_s"][key] = rate
            print(f"encoder (InceptionV3 299x299 -> 8x8x2048) batch {batch} "
                  f"{'mixed bfloat16' if mixed else 'float32'}: "
                  f"{rate:,.0f} images/s (target >= 2,000 in bfloat16)", flush=True)

    from trainer import data

    # (14, 16, 20): where most COCO captions fall; at toy sizes one of them (XLA compiles once per shape)
    buckets = data.jit_buckets((), 24)[2:3 if smoke else 5]
    steps = 2 if smoke else 30
    configs = [(b, jit, True) for b in ((4,) if smoke else (64, 256, 512)) for jit in (False, True)]
    configs += [((4 if smoke else 256), jit, False) for jit in (False, True)]
    result["train_step"] = {}
    for batch, jit, mixed in configs:
        r = step_rate(batch, jit, mixed, buckets, steps)
        dtype = "bfloat16" if mixed else "float32"
        r["mfu"] = r["flops_per_s"] / peak[dtype]
        key = f"batch{batch}_{dtype}_{'xla' if jit else 'graph'}"
        result["train_step"][key] = r
        print(f"train step batch {batch} {dtype} {'XLA' if jit else 'graph (no XLA)'}: "
              f"{r['real_tokens_per_s']:,.0f} real tokens/s (target >= 40,000), MFU {100 * r['mfu']:.1f}% "
              f"of {dtype} matmul; {r['warmup_s']:.1f}s to compile {len(buckets)} bucket shapes", flush=True)

    if len(gpus) >= 2 and not smoke:
        mirrored = tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(2)])
        r = step_rate(512, False, True, buckets, steps, strategy=mirrored)
        result["train_step"]["batch512_bfloat16_mirrored2"] = r
        print(f"train step batch 512 bfloat16, MirroredStrategy over 2 GPUs: {r['real_tokens_per_s']:,.0f} "
              "real tokens/s", flush=True)
    elif not smoke:
        print("one GPU: no two-replica MirroredStrategy run")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
