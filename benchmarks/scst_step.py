"""Time of the self-critical (SCST) train step, and the CIDEr-D reward's share of it, in one run.

    python -m benchmarks.scst_step [--batch 64] [--samples 5] [--max-length 24] [--steps 5]
                                   [--units 512] [--embedding-dim 256] [--vocab 5001]

The model is CaptionerConfig's defaults (units 512, embedding 256) over a COCO-sized vocabulary,
untrained, with random features; each image has 5 synthetic reference captions
(benchmarks.cider_reward's), whose document frequencies are counted over --corpus images.
An untrained model rarely says <end>, so most draws run to --max-length: the step does close to
its most work (a trained model's draws are shorter). Prints, as medians over --steps after one
warm-up step: seconds a step, sampled tokens/s (<end> included, the tokens the loss is over),
and the host time the reward took inside the step as a share of the step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def run(batch: int, samples: int, max_length: int, steps: int, units: int, embedding_dim: int, vocab: int,
        corpus: int, seed: int = 0) -> dict:
    import tensorflow as tf

    from benchmarks.cider_reward import synthetic_corpus
    from caption_eval import cider_d
    from caption_io import geometry
    from model import CaptionerConfig
    from trainer import scst
    from trainer.steps import CaptionSteps

    rng = np.random.default_rng(seed)
    references = synthetic_corpus(rng, max(corpus, batch), 5, vocab)
    scorer = cider_d.build_scorer(None, references)
    config = CaptionerConfig(vocab_size=vocab, units=units, embedding_dim=embedding_dim)
    positions, channels = geometry.DEFAULT.feature_shape
    steps_ = CaptionSteps(config, np.zeros(channels, np.float32), np.ones(channels, np.float32),
                          tf.distribute.get_strategy(), 1e-3, 5.0)
    step = scst.ScstSteps(steps_, scorer, max_length=max_length, samples=samples)
    longest = max(len(c) for refs in references[:batch] for c in refs)
    dense = np.zeros([batch, 5, longest], np.int32)
    for i, refs in enumerate(references[:batch]):
        for j, c in enumerate(refs):
            dense[i, j, :len(c)] = c
    features = tf.constant(rng.standard_normal([batch, positions, channels]).astype(np.float16))
    element = (features, tf.constant(dense), tf.fill([batch], 5))
    step.build(tuple(tf.TensorSpec.from_tensor(t) for t in element))
    times, shares, tokens = [], [], []
    for i in range(steps + 1):
        t = time.perf_counter()
        out = step.train_step(element, scst.step_seed(seed, i))
        float(out["loss"])
        if i:  # the first step traces and compiles
            times.append(time.perf_counter() - t)
            shares.append(float(out["reward_seconds"]) / times[-1])
            tokens.append(int(out["tokens"]))
    median = statistics.median(times)
    return {"batch": batch, "samples": samples, "max_length": max_length, "units": units,
            "embedding_dim": embedding_dim, "vocab": vocab, "sec_per_step_median": round(median, 4),
            "sampled_tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens, times)), 1),
            "mean_sample_length": round(statistics.mean(tokens) / (batch * samples), 2),
            "reward_share_median": round(statistics.median(shares), 4),
            "reward_ms_median": round(1000 * statistics.median(sh * s for sh, s in zip(shares, times)), 2),
            "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU",
            "traces": step.train_step.experimental_get_tracing_count()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=5001)
    p.add_argument("--corpus", type=int, default=2000, help="images the document frequencies are counted over")
    a = p.parse_args(argv)
    print(json.dumps(run(a.batch, a.samples, a.max_length, a.steps, a.units, a.embedding_dim, a.vocab, a.corpus),
                     indent=2))


if __name__ == "__main__":
    main()
