"""Per-channel feature statistics, mergeable across shards and workers."""
from __future__ import annotations

import apache_beam as beam
import numpy as np


class ChannelStats(beam.CombineFn):
    """Per-channel mean and standard deviation of [N, C] feature rows.

    Accumulates (count, mean, M2) per channel and merges with Chan et al.'s
    parallel update, which stays exact in float64 where sum-of-squares would
    cancel (the raw random-encoder features have std ~8e-4).
    """

    def create_accumulator(self):
        return (0, None, None)

    def add_input(self, acc, features):
        x = np.asarray(features, np.float64)
        x = x.reshape(-1, x.shape[-1])
        mean = x.mean(0)
        return self.merge_accumulators([acc, (x.shape[0], mean, ((x - mean) ** 2).sum(0))])

    def merge_accumulators(self, accs):
        n, mean, m2 = 0, None, None
        for bn, bmean, bm2 in accs:
            if bn == 0:
                continue
            if n == 0:
                n, mean, m2 = bn, np.array(bmean, np.float64), np.array(bm2, np.float64)
                continue
            total = n + bn
            delta = np.asarray(bmean) - mean
            mean = mean + delta * (bn / total)
            m2 = m2 + np.asarray(bm2) + delta ** 2 * (n * bn / total)
            n = total
        return (n, mean, m2)

    def extract_output(self, acc):
        n, mean, m2 = acc
        if n == 0:
            return None
        return {"count": n, "mean": mean.astype(np.float32), "std": np.sqrt(m2 / n).astype(np.float32)}


class MergeChannelStats(ChannelStats):
    """The same statistics from accumulators made elsewhere (one per shard)."""

    def add_input(self, acc, other):
        return self.merge_accumulators([acc, other])


def to_json(acc) -> dict:
    n, mean, m2 = acc
    return {"count": int(n), "mean": None if mean is None else mean.tolist(), "m2": None if m2 is None else m2.tolist()}


def from_json(d: dict):
    if not d["count"]:
        return (0, None, None)
    return (d["count"], np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64))
