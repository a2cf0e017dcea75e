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
    over flat arrays, never a Python dict per n-gram;
  - references are prepared once per batch (`CiderD.references`), their tf-idf vectors and
    norms computed once per image however many samples are scored against them;
  - the document frequencies are counted once over the training split's captions and cached
    in a file keyed by a digest of those captions (`load_or_build`).

`count_end` (on by default for the reward): the first `<end>` of a caption counts as one more
word, so "a dog on <end>" and a caption that runs to the length limit without `<end>` lose the
bigrams ("grass", "<end>") the references hold. Off, a caption is exactly its words, which is
what the evaluation's CIDEr scores. The document frequencies always count `<end>`: an n-gram
without it has the same frequency either way, so one cache serves both settings.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from caption_io import fileio, vocab

MAX_N = 4  # CIDEr-D's n-grams: 1..4
SIGMA = 6.0  # the length penalty's standard deviation, in words
ID_BITS = 15  # bits an id takes in an n-gram key: four ids (60 bits) and the order n (2 bits) fit an int64
MAX_ID = (1 << ID_BITS) - 1
_ORDER_SHIFT = MAX_N * ID_BITS  # the key's bits 60-61 hold n - 1
FORMAT = "cider-d-ids/1"  # changes when the key layout or the word rule changes: older caches are then stale

__all__ = ["CiderD", "DocumentFrequencies", "References", "StaleCacheError", "build_scorer",
           "leave_one_out_baseline", "load_or_build", "read_references", "references_digest"]


class StaleCacheError(ValueError):
    """A document-frequency cache counted over other references than the ones asked for."""


# ---------------------------------------------------------------------------------------------
# Token ids -> the words scored -> n-gram keys


def _padded(sequences) -> tuple[np.ndarray, np.ndarray]:
    """A list of id sequences of any lengths as a zero-padded [N, T] int64 matrix and lengths."""
    lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, int(lengths.sum()))
    out = np.zeros((len(sequences), int(lengths.max(initial=0))), np.int64)
    rows = np.repeat(np.arange(len(sequences)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out, lengths


def _as_matrix(sequences, lengths=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Candidates as given (an [N, T] array, or a list of sequences) as an int64 matrix and lengths."""
    if hasattr(sequences, "to_list"):  # a tf.RaggedTensor [N, (tokens)]
        sequences = sequences.to_list()
    elif isinstance(sequences, np.ndarray) or hasattr(sequences, "numpy"):
        ids = np.asarray(sequences, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"candidates must be [N, T] token ids, got shape {ids.shape}")
        return ids, None if lengths is None else np.asarray(lengths, np.int64)
    if lengths is not None:
        raise ValueError("lengths go with an [N, T] array; a list of sequences carries its own")
    return _padded(list(sequences))


def _kept(ids: np.ndarray, lengths: np.ndarray | None, count_end: bool) -> np.ndarray:
    """Which positions of [N, T] ids are the caption's scored words: within its length, before
    its first <end>, a word by vocab.is_word, or that first <end> itself when count_end."""
    is_end = ids == vocab.END_ID
    before_end = np.cumsum(is_end, axis=1) - is_end == 0  # no <end> at an earlier position
    keep = before_end & (vocab.is_word(ids) | (is_end if count_end else False))
    if lengths is not None:
        if lengths.shape != (ids.shape[0],):
            raise ValueError(f"lengths must be [{ids.shape[0]}], got shape {lengths.shape}")
        keep &= np.arange(ids.shape[1]) < lengths[:, None]
    return keep


def _compact(ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kept ids of each row moved to its front ([N, longest] zero-padded) and their counts:
    the words a caption is scored on, specials between them dropped."""
    counts = keep.sum(axis=1)
    out = np.zeros((ids.shape[0], int(counts.max(initial=0))), np.int64)
    rows, _ = np.nonzero(keep)
    out[rows, (np.cumsum(keep, axis=1) - 1)[keep]] = ids[keep]
    if out.size and out.max() > MAX_ID:
        raise ValueError(f"token id {int(out.max())} does not fit the {ID_BITS}-bit n-gram keys (ids up to {MAX_ID})")
    return out, counts


def _ngrams(words: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram (n = 1..4) of each row as (row, key) flat arrays. A key packs the n ids,
    the first most significant, and n - 1 above them, so equal keys are equal n-grams."""
    rows, keys = [], []
    for n in range(1, MAX_N + 1):
        width = words.shape[1] - n + 1
        if width <= 0:
            break
        key = np.full((words.shape[0], width), (n - 1) << _ORDER_SHIFT, np.int64)
        for k in range(n):
            key |= words[:, k:k + width] << (ID_BITS * (n - 1 - k))
        valid = np.arange(width) < (counts - n + 1)[:, None]
        rows.append(np.nonzero(valid)[0])
        keys.append(key[valid])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(keys)


def _order(keys: np.ndarray) -> np.ndarray:
    """n - 1 of each n-gram key."""
    return keys >> _ORDER_SHIFT


def _term_counts(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count each row's n-grams: (distinct keys, and per (row, n-gram) entry: its row, the index
    of its key among the distinct ones, its count). Entries come sorted by row, then key."""
    distinct, index = np.unique(keys, return_inverse=True)
    pairs, tf = np.unique(rows * max(distinct.size, 1) + index.reshape(-1), return_counts=True)
    return distinct, pairs // max(distinct.size, 1), pairs % max(distinct.size, 1), tf


def _words_of(sequences, lengths, count_end: bool) -> tuple[np.ndarray, np.ndarray]:
    ids, lengths = _as_matrix(sequences, lengths)
    return _compact(ids, _kept(ids, lengths, count_end))


# ---------------------------------------------------------------------------------------------
# Document frequencies: counted once over the training references, cached


def _flatten(references) -> tuple[list, np.ndarray]:
    """Reference sets (one list of id sequences per image) as one list of captions and the
    image each belongs to; an image without a reference is refused (CIDEr-D divides by R)."""
    references = [list(refs) for refs in references]
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"{len(empty)} reference set(s) hold no caption (first: index {empty[0]})")
    per_image = np.fromiter((len(r) for r in references), np.int64, len(references))
    return [c for refs in references for c in refs], np.repeat(np.arange(len(references)), per_image)


def references_digest(references) -> str:
    """sha256 of reference sets (their order, each caption's ids), with the key format: what a
    document-frequency cache is keyed by, so a cache of other captions is detected."""
    captions, image = _flatten(references)
    ids, lengths = _padded(captions)
    h = hashlib.sha256(FORMAT.encode())
    for part in (np.bincount(image, minlength=image.max(initial=-1) + 1), lengths, ids[_kept(ids, lengths, True)]):
        h.update(np.int64(part.size).tobytes())
        h.update(part.astype("<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DocumentFrequencies:
    """In how many reference sets (images) each n-gram occurs, over `n_documents` sets.

    keys: the n-gram keys (int64), in the order of their `_mix` (what `_Index` searches);
    counts: the sets holding each; digest: references_digest of the sets counted (what a cache
    file is checked against)."""

    keys: np.ndarray
    counts: np.ndarray
    n_documents: int
    digest: str

    @classmethod
    def from_references(cls, references, *, digest: str | None = None, chunk: int = 20000) -> DocumentFrequencies:
        """Count over reference sets (one list of id sequences per image, as the records hold
        them: <start> and <end> included), `chunk` images at a time to bound the memory.
        digest: what to record as their digest (default: references_digest of them)."""
        references = [list(refs) for refs in references]
        if not references:
            raise ValueError("document frequencies need at least one reference set")
        parts_keys, parts_counts = [], []
        for start in range(0, len(references), chunk):
            keys, counts = _set_counts(references[start:start + chunk])
            parts_keys.append(keys)
            parts_counts.append(counts)
        keys, index = np.unique(np.concatenate(parts_keys), return_inverse=True)
        counts = np.bincount(index.reshape(-1), weights=np.concatenate(parts_counts), minlength=keys.size)
        order = np.argsort(_mix(keys))
        return cls(keys[order], counts.astype(np.int64)[order], len(references),
                   digest or references_digest(references))

    @functools.cached_property
    def _index(self) -> _Index:
        return _Index(_mix(self.keys))

    def idf(self, keys: np.ndarray) -> np.ndarray:
        """log D - log max(1, df) of each n-gram key (an n-gram no set holds has df 0)."""
        at, found = self._index.find(keys)
        df = np.where(found, self.counts[at], 0) if self.keys.size else np.zeros(keys.shape)
        return np.log(float(self.n_documents)) - np.log(np.maximum(df, 1.0))

    def save(self, path: str) -> None:
        """Write an .npz (local or gs://, atomically through caption_io.fileio)."""
        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, counts=self.counts, n_documents=np.int64(self.n_documents),
                 digest=np.array(self.digest), format=np.array(FORMAT))
        fileio.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str, digest: str | None = None) -> DocumentFrequencies:
        """Read a saved cache; StaleCacheError when it was written by another key format or,
        given `digest`, counted over other references."""
        with np.load(io.BytesIO(fileio.read_bytes(path))) as z:
            found_format = str(z["format"]) if "format" in z.files else "none"
            if found_format != FORMAT:
                raise StaleCacheError(f"{path}: written as {found_format}, this code reads {FORMAT}")
            df = cls(z["keys"].astype(np.int64), z["counts"].astype(np.int64), int(z["n_documents"]),
                     str(z["digest"]))
        if digest is not None and df.digest != digest:
            raise StaleCacheError(f"{path}: counted over other references (digest {df.digest[:12]}, "
                                  f"expected {digest[:12]})")
        return df


_MIX = (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9), np.uint64(27), np.uint64(0x94D049BB133111EB), np.uint64(31))


def _mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of 64-bit keys (so equal mixes are equal n-grams) whose
    top bits are spread evenly whatever the keys' structure, for `_Index`'s buckets."""
    s1, m1, s2, m2, s3 = _MIX
    x = np.asarray(keys).astype(np.uint64)
    x = (x ^ (x >> s1)) * m1
    x = (x ^ (x >> s2)) * m2
    return x ^ (x >> s3)


class _Index:
    """Where keys are among millions (the training split's n-grams) at a few random reads each.

    A binary search over the whole sorted array (np.searchsorted) misses the cache at each of its
    ~24 steps and was most of a batch's reward time at COCO's size; here the mixed keys' top bits
    pick a bucket of ~4 (a directory of bucket starts), and the binary search runs inside it, for
    all the queries at once."""

    def __init__(self, mixed: np.ndarray):
        if mixed.size and np.any(mixed[1:] < mixed[:-1]):
            raise ValueError("document frequencies must be stored in the order of their keys' mix")
        self.mixed = mixed
        bits = max(1, int(np.ceil(np.log2(max(mixed.size, 1) / 4))) if mixed.size > 4 else 1)
        self.shift = np.uint64(64 - bits)
        per_bucket = np.bincount((mixed >> self.shift).astype(np.int64), minlength=1 << bits)
        self.starts = np.concatenate([[0], np.cumsum(per_bucket)])

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of each key: its position in the stored order when found."""
        n = self.mixed.size
        if n == 0:
            return np.zeros(np.shape(keys), np.int64), np.zeros(np.shape(keys), bool)
        h = _mix(keys)
        bucket = (h >> self.shift).astype(np.int64)
        lo, end = self.starts[bucket], self.starts[bucket + 1]
        hi = end.copy()
        while True:
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) // 2
            right = open_ & (self.mixed[np.minimum(mid, n - 1)] < h)
            lo = np.where(right, mid + 1, lo)
            hi = np.where(open_ & ~right, mid, hi)
        at = np.minimum(lo, n - 1)
        return at, (lo < end) & (self.mixed[at] == h)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted. Not np.unique: without return_* numpy 2.4 takes a hashing
    path that ran 16x slower than this sort on 4M int64s."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


def _set_counts(references) -> tuple[np.ndarray, np.ndarray]:
    """The distinct n-grams of some reference sets and how many of those sets hold each."""
    captions, image = _flatten(references)
    rows, keys = _ngrams(*_words_of(captions, None, count_end=True))
    distinct, index = np.unique(keys, return_inverse=True)
    held = _distinct(image[rows] * max(distinct.size, 1) + index.reshape(-1))  # (set, n-gram), once each
    return distinct, np.bincount(held % max(distinct.size, 1), minlength=distinct.size)


def load_or_build(path: str | None, references, *, digest: str | None = None) -> DocumentFrequencies:
    """The document frequencies of `references`, from the cache at `path` when it was counted
    over them, else counted now and written there (path None: counted, not cached).

    references: the reference sets, or a function returning them, called only when the cache
    misses, for a caller that keys the cache by its own `digest` (e.g. of the shards' sha256)
    so a hit does not read the captions. Without `digest` it is references_digest(references).
    """
    if digest is None:
        if callable(references):
            references = references()
        digest = references_digest(references)
    if path is not None and fileio.exists(path):
        try:
            return DocumentFrequencies.load(path, digest)
        except StaleCacheError:
            pass  # counted over other captions, or another format: counted again below, then replaced
    df = DocumentFrequencies.from_references(references() if callable(references) else references, digest=digest)
    if path is not None:
        df.save(path)
    return df


def read_references(files: Sequence[str]) -> list[list[list[int]]]:
    """Every image's captions (id sequences, as stored) of some shard files, in file order:
    the training references the document frequencies are counted over."""
    import tensorflow as tf  # here, not above: scoring needs numpy alone (records imports TensorFlow)

    from caption_io import records

    out = []
    for batch in tf.data.TFRecordDataset(list(files)).batch(256):
        out.extend(records.parse_examples(batch)["captions"].to_list())
    return out


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
        captions, image = _flatten(references)
        words, counts = _words_of(captions, None, self.count_end)
        distinct, ref, index, tf = _term_counts(*_ngrams(words, counts))
        weight = self.df.idf(distinct)[index] * tf
        norms = _norms(ref, _order(distinct)[index], weight, len(captions))
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
        words, counts = _words_of(candidates, lengths, self.count_end)
        n = counts.size
        image = np.arange(n) if image_index is None else np.asarray(image_index, np.int64).reshape(-1)
        if image.shape != (n,) or (n and (image.min() < 0 or image.max() >= references.n_images)):
            raise ValueError(f"image_index must give each of the {n} candidates one of the "
                             f"{references.n_images} reference sets")
        distinct, row, index, tf = _term_counts(*_ngrams(words, counts))
        idf = self.df.idf(distinct)[index]
        order = _order(distinct)[index]
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
