"""What every decoder returns (model.decoding): a `Decoded`, in three named families.

    out.best    Hypotheses, the caption of each image: [B] and [B, T] tensors
    out.beam    Beam, every hypothesis of the beam, best first: [B, k] and [B, k, T]
                (greedy and sampling: k = 1, the caption)
    out.nbest   Hypotheses, the first K of the beam (K = num_captions): [B, K] and [B, K, T']

A Decoded is also flat, a namedtuple of the families' fields prefixed by their family (the best
caption's without prefix): out.tokens is out.best.tokens, out.beam_scores out.beam.scores,
out.nbest_lengths out.nbest.lengths; `_asdict()` gives them by those names, as a signature's
outputs. T <= max_length: the longest caption returned, all k hypotheses counted for beams, so
`tokens` may end in columns of 0.

Hypotheses' fields:
    tokens            int32 [..., T]   the caption without <start>; ends with <end> where it
                                       ended (a caption cut at max_length has none); 0 after
    scores            float32 [...]    its log-probability under the model: the sum of the
                                       chosen tokens' log_softmax, <end> included
    normalized_scores float32 [...]    scores / length_penalty(lengths) (what beams rank by)
    attention         float32 [..., T, P]  the attention weights that produced each token; each
                                       row of a generated token sums to 1, rows after it are 0
    lengths           int32 [...]      generated tokens, <end> included
Beam has the same fields but attention. In nbest, T' <= T is the longest of the K; a place that
no hypothesis filled (fewer than K came back: only when the model or the bans leave fewer than
K allowed sequences) is blank: tokens 0, length 0, score and normalised score -inf, attention 0.
Real ones come first (scores sorted).

Length normalisation (GNMT, Wu et al. 2016): a hypothesis of n tokens (<end> included) with
log-probability s ranks by s / lp(n), lp(n) = ((5 + n) / 6) ** alpha. alpha = 0 ranks by raw
log-probability (which favours short captions); larger alpha favours longer ones. Greedy and
sampling report normalized_scores with alpha = DEFAULT_ALPHA, for comparison only.
"""
from __future__ import annotations

import collections
import typing

import tensorflow as tf

from caption_io import decoding_defaults

DEFAULT_ALPHA = decoding_defaults.LENGTH_ALPHA


class Hypotheses(typing.NamedTuple):
    """Captions with their scores and attention: the best of each image, or its n best."""

    tokens: tf.Tensor
    scores: tf.Tensor
    normalized_scores: tf.Tensor
    attention: tf.Tensor
    lengths: tf.Tensor


class Beam(typing.NamedTuple):
    """Every hypothesis of each image's beam, best first."""

    tokens: tf.Tensor
    scores: tf.Tensor
    normalized_scores: tf.Tensor
    lengths: tf.Tensor

    @classmethod
    def of(cls, hypotheses: Hypotheses) -> Beam:
        """The beam's fields of `hypotheses` (all but attention)."""
        return cls(*(getattr(hypotheses, field) for field in cls._fields))


_FAMILIES = (("", Hypotheses), ("beam_", Beam), ("nbest_", Hypotheses))


class Decoded(collections.namedtuple("Decoded", [prefix + field for prefix, record in _FAMILIES
                                                 for field in record._fields])):
    """The decoders' result: the families `best`, `beam` and `nbest` (module docstring), stored
    flat so that tf.nest, tf.cond and a signature's outputs see one tensor a field."""

    __slots__ = ()

    @classmethod
    def of(cls, best: Hypotheses, beam: Beam, nbest: Hypotheses) -> Decoded:
        return cls(*best, *beam, *nbest)

    @property
    def best(self) -> Hypotheses:
        return Hypotheses(*self[:len(Hypotheses._fields)])

    @property
    def beam(self) -> Beam:
        first = len(Hypotheses._fields)
        return Beam(*self[first:first + len(Beam._fields)])

    @property
    def nbest(self) -> Hypotheses:
        return Hypotheses(*self[len(Hypotheses._fields) + len(Beam._fields):])


def length_penalty(lengths, alpha):
    """GNMT's lp(n) = ((5 + n) / 6) ** alpha, float32."""
    n = tf.cast(lengths, tf.float32)
    return tf.pow((5.0 + n) / 6.0, tf.cast(alpha, tf.float32))
