"""CIDEr-D's document frequencies: in how many reference sets (images) each n-gram occurs,
counted once over the training split's captions and cached in a file keyed by a digest of those
captions (`load_or_build`), so a restart reads no captions to trust the cache.

The look-up (`DocumentFrequencies.idf`) finds a batch's n-gram keys among the millions of the
training split's through `_Index`: the keys are stored in the order of a 64-bit mix, whose top
bits pick a small bucket to search.
"""
from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caption_eval import ngram_keys
from caption_io import fileio

FORMAT = "cider-d-ids/1"  # changes when the key layout or the word rule changes: older caches are then stale


class StaleCacheError(ValueError):
    """A document-frequency cache counted over other references than the ones asked for."""


def flatten(references) -> tuple[list, np.ndarray]:
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
    captions, image = flatten(references)
    ids, lengths = ngram_keys.padded(captions)
    h = hashlib.sha256(FORMAT.encode())
    for part in (np.bincount(image, minlength=image.max(initial=-1) + 1), lengths,
                 ids[ngram_keys.kept(ids, lengths, True)]):
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
    captions, image = flatten(references)
    rows, keys = ngram_keys.ngrams(*ngram_keys.words_of(captions, None, count_end=True))
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
        out.extend(records.parse_examples(batch, None)["captions"].to_list())
    return out
