"""CIDEr-D's n-grams as int64 keys: token ids -> the words a caption is scored on -> n-gram keys.

An n-gram is one int64: up to four 15-bit ids, the first most significant, and its order n - 1
in the bits above them, so equal keys are equal n-grams and counting, matching and the
document-frequency look-up are numpy sorts, searchsorted and bincount over flat arrays, never a
Python dict per n-gram. A caption's words are the ids `caption_io.vocab.is_word` calls words,
before its first <end>; with `count_end` that first <end> counts as one more word (the reward's
setting, see caption_eval.cider_d).

A change to the key layout or to the word rule must change document_frequencies.FORMAT: the
cached document frequencies are keyed by it.
"""
from __future__ import annotations

import itertools

import numpy as np

from caption_io import vocab

MAX_N = 4  # CIDEr-D's n-grams: 1..4
ID_BITS = 15  # bits an id takes in an n-gram key: four ids (60 bits) and the order n (2 bits) fit an int64
MAX_ID = (1 << ID_BITS) - 1
_ORDER_SHIFT = MAX_N * ID_BITS  # the key's bits 60-61 hold n - 1


def padded(sequences) -> tuple[np.ndarray, np.ndarray]:
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
    return padded(list(sequences))


def kept(ids: np.ndarray, lengths: np.ndarray | None, count_end: bool) -> np.ndarray:
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


def ngrams(words: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def order_of(keys: np.ndarray) -> np.ndarray:
    """n - 1 of each n-gram key."""
    return keys >> _ORDER_SHIFT


def term_counts(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count each row's n-grams: (distinct keys, and per (row, n-gram) entry: its row, the index
    of its key among the distinct ones, its count). Entries come sorted by row, then key."""
    distinct, index = np.unique(keys, return_inverse=True)
    pairs, tf = np.unique(rows * max(distinct.size, 1) + index.reshape(-1), return_counts=True)
    return distinct, pairs // max(distinct.size, 1), pairs % max(distinct.size, 1), tf


def words_of(sequences, lengths, count_end: bool) -> tuple[np.ndarray, np.ndarray]:
    """The scored words of captions given as [N, T] ids (cut at `lengths` [N] when given) or as a
    list of id sequences: ([N, longest] zero-padded words, their counts)."""
    ids, lengths = _as_matrix(sequences, lengths)
    return _compact(ids, kept(ids, lengths, count_end))
