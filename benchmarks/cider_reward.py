"""Time of the CIDEr-D reward for one self-critical batch next to pycocoevalcap's Cider, in one run.

    python -m benchmarks.cider_reward [--batch 64] [--samples 5] [--data DATA_DIR] [--step]

One batch is B images x K sampled captions (10-16 ids, <start> and <end> included, over a
~5,000-word vocabulary), each image with 5 references. Times, as medians over --repeats:
  - caption_eval.cider_d: preparing the batch's references and scoring the B*K samples,
    with document frequencies counted once (and cached) over --corpus synthetic reference
    captions, or over a data directory's training captions with --data;
  - pycocoevalcap's Cider on the same candidates and references (its document frequencies
    come from the references it is given; the strings are made before the clock starts);
and prints ms per batch and the ratio, plus the largest difference between the two scores
when ours counts its document frequencies from the same references (a parity check).
--step also times the project's train step at batch 64 (benchmarks.train_throughput), the
time the reward should stay well under.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from caption_eval import cider_d
from caption_io import vocab

FIRST, END, START, PAD = vocab.FIRST_WORD_ID, vocab.END_ID, vocab.START_ID, vocab.PAD_ID


def _zipf(vocab_size: int) -> np.ndarray:
    """Word probabilities falling with rank, as a caption vocabulary's do ("a" and "on" often)."""
    p = 1.0 / (np.arange(vocab_size - FIRST) + 10.0)
    return p / p.sum()


def _caption(rng, p: np.ndarray, topic: np.ndarray | None = None) -> list[int]:
    """<start>, 8-14 words (a third drawn from the image's topic words when given), <end>."""
    words = FIRST + rng.choice(p.size, int(rng.integers(8, 15)), p=p)
    if topic is not None:
        mine = rng.random(words.size) < 0.35
        words[mine] = rng.choice(topic, int(mine.sum()))
    return [START, *map(int, words), END]


def synthetic_corpus(rng, images: int, refs: int, vocab_size: int) -> list[list[list[int]]]:
    p = _zipf(vocab_size)
    return [[_caption(rng, p, FIRST + rng.choice(p.size, 6)) for _ in range(refs)] for _ in range(images)]


def sample_like(rng, refs: list[list[int]], k: int, length: int, vocab_size: int) -> np.ndarray:
    """K sampled captions of an image as a decoder leaves them ([K, length], <pad> after <end>):
    one of its references with some words replaced, a fifth running to the length without <end>."""
    out = np.full((k, length), PAD, np.int64)
    for j in range(k):
        words = np.array(refs[int(rng.integers(len(refs)))][1:-1])
        swap = rng.random(words.size) < 0.3
        words[swap] = rng.integers(FIRST, vocab_size, int(swap.sum()))
        seq = [START, *words.tolist()] + ([END] if rng.random() < 0.8 else
                                          rng.integers(FIRST, vocab_size, length).tolist())
        out[j] = seq[:length] + [PAD] * (length - len(seq[:length]))
    return out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def _text(ids) -> str:
    """A caption for pycocoevalcap: its words (and its first <end>, which the reward counts)."""
    out = []
    for i in ids:
        if i == END:
            out.append("<end>")
            break
        if i >= FIRST:
            out.append(f"w{i}")
    return " ".join(out)


def pycoco_inputs(samples: np.ndarray, refs: list) -> tuple[dict, dict]:
    b, k, _ = samples.shape
    gts = {i: [_text(r) for r in refs[i // k]] for i in range(b * k)}
    res = {i: [_text(samples[i // k, i % k])] for i in range(b * k)}
    return gts, res


def corpus_of(args, rng) -> tuple[list, str]:
    if args.data:
        from caption_io import metadata

        meta = metadata.read(args.data)
        return cider_d.read_references(metadata.shard_files(args.data, "train", meta)), f"{args.data} train"
    return (synthetic_corpus(rng, args.corpus // args.refs, args.refs, args.vocab),
            f"{args.corpus:,} synthetic captions")


def train_step_ms() -> float:
    """The project's train step at batch 64, captions of 16 ids (COCO's lengths)."""
    from benchmarks.train_throughput import ours

    return 1000.0 * ours(16, steps=10, warmup=3, mixed=False, jit=False)["sec_per_step_median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images a batch")
    ap.add_argument("--samples", type=int, default=5, help="sampled captions an image (K)")
    ap.add_argument("--refs", type=int, default=5, help="references an image")
    ap.add_argument("--vocab", type=int, default=5000, help="vocabulary size of the synthetic captions")
    ap.add_argument("--corpus", type=int, default=10000, help="synthetic reference captions the DF is counted over")
    ap.add_argument("--data", help="count the DF over this data directory's training captions, draw the batch there")
    ap.add_argument("--length", type=int, default=20, help="the samples' padded length")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--step", action="store_true", help="also time the train step at batch 64")
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    corpus, source = corpus_of(args, rng)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        df = cider_d.load_or_build(os.path.join(tmp, "df.npz"), corpus)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        cider_d.load_or_build(os.path.join(tmp, "df.npz"), corpus)
        hit_s = time.perf_counter() - t
    print(f"document frequencies over {source} ({df.n_documents:,} images, {df.keys.size:,} n-grams): "
          f"counted and cached in {build_s:.2f} s, a cache hit (digest included) {hit_s:.2f} s")

    picked = rng.choice(len(corpus), args.batch, replace=len(corpus) < args.batch)
    refs = [corpus[i][:args.refs] for i in picked]
    vocab_size = args.vocab if not args.data else int(max(max(max(c) for c in r) for r in corpus)) + 1
    samples = np.stack([sample_like(rng, r, args.samples, args.length, vocab_size) for r in refs])
    scorer = cider_d.CiderD(df, count_end=True)
    reward = lambda: scorer.score_samples(samples, scorer.references(refs))
    rewards = reward()
    ours_ms = _median_ms(reward, args.repeats)
    prepared = scorer.references(refs)
    score_ms = _median_ms(lambda: scorer.score_samples(samples, prepared), args.repeats)

    from pycocoevalcap.cider.cider import Cider

    gts, res = pycoco_inputs(samples, refs)
    theirs = np.asarray(Cider().compute_score(gts, res)[1])
    coco_ms = _median_ms(lambda: Cider().compute_score(gts, res), max(3, args.repeats // 4))
    same_df = cider_d.CiderD(cider_d.DocumentFrequencies.from_references([refs[i // args.samples]
                                                                          for i in range(len(gts))]))
    parity = float(np.abs(same_df.score_samples(samples, refs).reshape(-1) - theirs).max())

    n = args.batch * args.samples
    print(f"reward of {args.batch} x {args.samples} = {n} samples, {args.refs} references each: "
          f"cider_d {ours_ms:.2f} ms a batch ({score_ms:.2f} ms of it scoring, the rest preparing the references) "
          f"| pycocoevalcap Cider {coco_ms:.1f} ms | {coco_ms / ours_ms:.0f}x faster")
    print(f"mean reward {rewards.mean():.3f}; with pycocoevalcap's document frequencies the scores differ "
          f"from its by at most {parity:.1e}")
    result = {"candidates": n, "cider_d_ms": ours_ms, "cider_d_score_only_ms": score_ms, "pycocoevalcap_ms": coco_ms,
              "speedup": coco_ms / ours_ms, "max_abs_diff_same_df": parity, "df_build_s": build_s,
              "df_cache_hit_s": hit_s, "df_images": df.n_documents, "df_ngrams": int(df.keys.size)}
    if args.step:
        step = train_step_ms()
        result["train_step_ms"] = step
        print(f"train step at batch 64 (16 ids): {step:.0f} ms; the reward is {100 * ours_ms / step:.1f}% of it")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
