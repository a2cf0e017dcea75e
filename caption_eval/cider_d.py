"""CIDEr-D over token ids, vectorised with numpy: the reward of self-critical training.

The reward is pycocoevalcap's `Cider` (which is CIDEr-D) computed on the ids the model
generates and the records store, rather than on strings: a caption's words are the ids
`caption_io.vocab.is_word` calls words, which were cut by the project's own tokenisation
(caption_io.text) when the pipeline built the vocabulary, so no second tokeniser is involved.
The definition followed, for a candidate c and the references r_1..r_R of its image:

    g_n(s)   = the tf-idf vector of s's n-grams: count(s, g) * (log D - log max(1, df(g)))
    sim_n    = sum_g min(g_n(c), g_n(r)) * g_n(r) / (|g_n(c)| |g_n(r)|)   (0 when a norm is 0)
    CIDEr-D  = 10 / (4 R) * sum_r sum_{n=1..4} sim_n(c, r) * exp(-(l(c) - l(r))^2 / (2 * 6^2))

where D is the number of reference sets (images) the document frequencies df were counted
over, each image counting once per n-gram whatever number of its captions hold it, and l(s)
is s's number of words. (pycocoevalcap counts bigrams, words - 1: the difference is the same
unless a caption is empty, and a pair with an empty caption has a zero norm and scores 0.)

What is fast here, for one batch of B images x K samples against their references:
  - an n-gram is one int64: up to four 15-bit ids and its order n in the top bits, so counting,
    matching and the document-frequency look-up are numpy sorts, searchsorted and bincount
    over flat arrays, never a Python dict per n-gram (caption_eval.ngram_keys);
  - references are prepared once per batch (`CiderD.references`), their tf-idf vectors and
    norms computed once per image however many samples are scored against them;
  - the document frequencies are counted once over the training split's captions and cached
    in a file keyed by a digest of those captions (`load_or_build`, in
    caption_eval.document_frequencies).

This module holds the scorer; the n-gram keys and the document frequencies are modules of their
own, and their public names are importable from here too (`cider_d.load_or_build`, ...), which
is where the trainer and the tests take them from.

`count_end` (on by default for the reward): the first `<end>` of a caption counts as one more
word, so "a dog on <end>" and a caption that runs to the length limit without `<end>` lose the
bigrams ("grass", "<end>") the references hold. Off, a caption is exactly its words, which is
what the evaluation's CIDEr scores. The document frequencies always count `<end>`: an n-gram
without it has the same frequency either way, so one cache serves both settings.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from caption_eval import ngram_keys

# What moved to the n-gram keys' and the document frequencies' modules stays importable from here:
# the trainer, the tests and the benchmarks take it from cider_d.
from caption_eval.document_frequencies import FORMAT as FORMAT
from caption_eval.document_frequencies import (
    DocumentFrequencies,
    StaleCacheError,
    _mix,  # noqa: F401  (a test stores keys in its order)
    flatten,
    load_or_build,
    read_references,
    references_digest,
)
from caption_eval.ngram_keys import ID_BITS as ID_BITS
from caption_eval.ngram_keys import MAX_ID as MAX_ID
from caption_eval.ngram_keys import MAX_N

SIGMA = 6.0  # the length penalty's standard deviation, in words

__all__ = ["CiderD", "DocumentFrequencies", "References", "StaleCacheError", "build_scorer",
           "leave_one_out_baseline", "load_or_build", "read_references", "references_digest"]


# ---------------------------------------------------------------------------------------------
# The scorer


@dataclass(frozen=True)
class References:
    """A batch's reference sets, prepared once for every candidate scored against them.

    keys: their distinct n-gram keys (sorted). For each (image, n-gram, caption holding it), sorted
    by (image, n-gram): join (image * len(keys) + the n-gram's index in keys), ref (the caption's
    row) and tf (its count there). Per caption: norms [M, 4] (of its tf-idf vector for each n),
    length (its words). Per image: first (its first caption's row), count (its captions)."""

    count_end: bool
    keys: np.ndarray
    join: np.ndarray
    ref: np.ndarray
    tf: np.ndarray
    norms: np.ndarray
    length: np.ndarray
    first: np.ndarray
    count: np.ndarray

    @property
    def n_images(self) -> int:
        return self.first.size


def _norms(rows: np.ndarray, order: np.ndarray, weight: np.ndarray, n_rows: int) -> np.ndarray:
    """|g_n(s)| of each row and order n: the root of the summed squared tf-idf weights."""
    sums = np.bincount(rows * MAX_N + order, weights=weight * weight, minlength=n_rows * MAX_N)
    return np.sqrt(sums).reshape(n_rows, MAX_N)


class CiderD:
    """CIDEr-D of token-id captions against their images' references, with fixed document
    frequencies (`DocumentFrequencies`: the training split's, for the reward).

    count_end: score each caption's first <end> as a word (the reward's setting, see the module
    docstring); False scores the words alone, like the evaluation's CIDEr. sigma: the length
    penalty's width (CIDEr-D's 6)."""

    def __init__(self, df: DocumentFrequencies, *, count_end: bool = True, sigma: float = SIGMA):
        self.df, self.count_end, self.sigma = df, count_end, float(sigma)

    def references(self, references) -> References:
        """Prepare reference sets (a list per image of id sequences, <start>/<end> as stored)."""
        captions, image = flatten(references)
        words, counts = ngram_keys.words_of(captions, None, self.count_end)
        distinct, ref, index, tf = ngram_keys.term_counts(*ngram_keys.ngrams(words, counts))
        weight = self.df.idf(distinct)[index] * tf
        norms = _norms(ref, ngram_keys.order_of(distinct)[index], weight, len(captions))
        join = image[ref] * max(distinct.size, 1) + index
        by_join = np.argsort(join, kind="stable")
        per_image = np.bincount(image, minlength=len(references))
        return References(self.count_end, distinct, join[by_join], ref[by_join], tf[by_join], norms,
                          counts, np.cumsum(per_image) - per_image, per_image)

    def score(self, candidates, references, *, lengths=None, image_index=None) -> np.ndarray:
        """CIDEr-D of each candidate: float64 [N].

        candidates: [N, T] token ids (numpy or an eager tensor; `lengths` [N] cuts each row,
        and anything after a row's first <end> is ignored anyway) or a list of id sequences.
        references: `References` from `self.references`, or the reference sets themselves.
        image_index: [N], the reference set of each candidate (default: candidate i against set
        i); `score_samples` lays K samples per image out for it."""
        if not isinstance(references, References):
            references = self.references(references)
        if references.count_end != self.count_end:
            raise ValueError(f"references prepared with count_end={references.count_end}, "
                             f"scoring with count_end={self.count_end}")
        words, counts = ngram_keys.words_of(candidates, lengths, self.count_end)
        n = counts.size
        image = np.arange(n) if image_index is None else np.asarray(image_index, np.int64).reshape(-1)
        if image.shape != (n,) or (n and (image.min() < 0 or image.max() >= references.n_images)):
            raise ValueError(f"image_index must give each of the {n} candidates one of the "
                             f"{references.n_images} reference sets")
        distinct, row, index, tf = ngram_keys.term_counts(*ngram_keys.ngrams(words, counts))
        idf = self.df.idf(distinct)[index]
        order = ngram_keys.order_of(distinct)[index]
        norms = _norms(row, order, idf * tf, n)
        pair_cand, pair_ref, first_pair = self._pairs(image, references)
        overlap = self._overlap(references, distinct, row, index, tf, idf, order, image, first_pair,
                                pair_ref.size)
        return self._combine(overlap, norms, counts, pair_cand, pair_ref, references, image)

    def score_samples(self, samples, references, *, lengths=None) -> np.ndarray:
        """CIDEr-D of K samples per image: samples [B, K, T] ids (lengths [B, K]) against B
        reference sets (or their `References`), as [B, K] float64."""
        samples = np.asarray(samples, np.int64)
        if samples.ndim != 3:
            raise ValueError(f"samples must be [B, K, T] token ids, got shape {samples.shape}")
        b, k, t = samples.shape
        flat_lengths = None if lengths is None else np.asarray(lengths, np.int64).reshape(b * k)
        scores = self.score(samples.reshape(b * k, t), references, lengths=flat_lengths,
                            image_index=np.repeat(np.arange(b), k))
        return scores.reshape(b, k)

    @staticmethod
    def _pairs(image: np.ndarray, refs: References) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (candidate, reference caption of its image) pair: their rows, and each candidate's
        first pair (pairs of a candidate are contiguous, in its references' order)."""
        per = refs.count[image]
        first_pair = np.cumsum(per) - per
        pair_cand = np.repeat(np.arange(image.size), per)
        pair_ref = refs.first[image][pair_cand] + np.arange(per.sum()) - first_pair[pair_cand]
        return pair_cand, pair_ref, first_pair

    @staticmethod
    def _overlap(refs: References, distinct, row, index, tf, idf, order, image, first_pair, n_pairs) -> np.ndarray:
        """sum_g min(g_n(c), g_n(r)) * g_n(r) per (pair, n) = idf^2 * min(tf_c, tf_r) * tf_r summed
        over the n-grams a candidate shares with each reference of its image ([pairs, 4])."""
        at = np.minimum(np.searchsorted(refs.keys, distinct), max(refs.keys.size - 1, 0))
        shared = (refs.keys[at] == distinct)[index] if refs.keys.size else np.zeros(index.size, bool)
        e = np.nonzero(shared)[0]  # candidate entries whose n-gram some reference of the batch holds
        key = image[row[e]] * max(refs.keys.size, 1) + at[index[e]]
        lo, hi = np.searchsorted(refs.join, key, "left"), np.searchsorted(refs.join, key, "right")
        hits = hi - lo
        entry = np.repeat(e, hits)  # one row per (candidate entry, reference caption holding it)
        pos = np.repeat(lo, hits) + np.arange(hits.sum()) - np.repeat(np.cumsum(hits) - hits, hits)
        ref_tf = refs.tf[pos]
        value = idf[entry] ** 2 * np.minimum(tf[entry], ref_tf) * ref_tf
        pair = first_pair[row[entry]] + refs.ref[pos] - refs.first[image[row[entry]]]
        return np.bincount(pair * MAX_N + order[entry], weights=value, minlength=n_pairs * MAX_N).reshape(-1, MAX_N)

    def _combine(self, overlap, norms, counts, pair_cand, pair_ref, refs: References, image) -> np.ndarray:
        """Cosines (0 where a norm is 0), the length penalty, the mean over n and references, x10."""
        denominator = norms[pair_cand] * refs.norms[pair_ref]
        cosine = np.divide(overlap, denominator, out=overlap.copy(), where=denominator != 0)
        delta = (counts[pair_cand] - refs.length[pair_ref]).astype(np.float64)
        per_pair = cosine.sum(axis=1) * np.exp(-(delta * delta) / (2.0 * self.sigma ** 2))
        total = np.bincount(pair_cand, weights=per_pair, minlength=counts.size)
        return 10.0 * total / (MAX_N * refs.count[image])


def leave_one_out_baseline(rewards) -> np.ndarray:
    """The baseline of each of K samples of an image: the mean reward of the other K - 1
    ([B, K] -> [B, K]), so a sample's advantage is reward - baseline without its own reward
    biasing the baseline (K >= 2)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, K] with K >= 2 samples per image, got shape {rewards.shape}")
    k = rewards.shape[1]
    return (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)


def build_scorer(path: str | None, references: Callable[[], list] | list, *, digest: str | None = None,
                 count_end: bool = True) -> CiderD:
    """A reward scorer over the cached (or now counted) document frequencies of `references`."""
    return CiderD(load_or_build(path, references, digest=digest), count_end=count_end)
