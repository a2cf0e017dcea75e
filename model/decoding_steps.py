"""What every decoder's step shares (model.decoding, model.beam_search): the tokens it may
choose (never <pad> or <start>; the decoding controls' bans) and the while-loop's shapes.

The controls (model.decoding's docstring says what they do) arrive checked as `Controls`, or
None when none is on, and `apply_controls` puts their bans into a step's log-probabilities.
"""
import collections

import tensorflow as tf

from caption_io.vocab import PAD_ID

# The bans in force, as int32 scalar tensors; None when both are off by Python constants, so
# that the decoders add no control op to the graph when none is asked for.
Controls = collections.namedtuple("Controls", ["no_repeat_ngram", "min_length"])


# ---------------------------------------------------------------------------------- controls
def checked_controls(no_repeat_ngram, min_length):
    """Checked Controls, or None when both are the Python 0 that turns them off: the decoders
    then add nothing to the graph for them."""
    if isinstance(no_repeat_ngram, int) and isinstance(min_length, int):
        at_least(no_repeat_ngram, 0, "no_repeat_ngram")
        at_least(min_length, 0, "min_length")
        if no_repeat_ngram == 0 and min_length == 0:
            return None
    return Controls(at_least(no_repeat_ngram, 0, "no_repeat_ngram"),
                    at_least(min_length, 0, "min_length"))


def checked_num_captions(num_captions, beam_size):
    """num_captions checked against 1 <= K <= beam_size: an int when both are ints (a
    ValueError now), else an int32 tensor that carries a run-time assertion."""
    if isinstance(num_captions, int) and isinstance(beam_size, int):
        if not 1 <= num_captions <= beam_size:
            raise ValueError(f"num_captions must be in [1, beam_size = {beam_size}], "
                             f"got {num_captions}")
        return num_captions
    count = at_least(num_captions, 1, "num_captions")
    check = tf.debugging.assert_less_equal(count, tf.cast(beam_size, tf.int32),
                                           message="num_captions must be <= beam_size")
    with tf.control_dependencies([check]):
        return tf.identity(count)


def at_least(value, minimum, name):
    """value as an int32 scalar tensor, checked >= minimum: a Python int at once (ValueError),
    a tensor when the graph runs (a tf.debugging assertion)."""
    if isinstance(value, int):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        return tf.constant(value, tf.int32)
    value = tf.cast(value, tf.int32)
    check = tf.debugging.assert_greater_equal(value, minimum, message=f"{name} must be >= {minimum}")
    with tf.control_dependencies([check]):
        return tf.identity(value)


def apply_controls(allowed, history, t, controls, end_id):
    """allowed [R, V]: log-probs, -inf where a token may not be chosen; history [R, t] int32:
    each row's tokens so far; t: the step. -> allowed with the controls' bans at -inf.

    A tf.cond skips the work at the steps where no control is active (no_repeat_ngram 0 and
    t >= min_length), so controls passed as tensors cost little when they are off. Both bans
    go in with one scatter (a min with -inf where banned, +inf elsewhere): a pass over
    [R, V] costs more here than all the n-gram compares (see benchmarks/decoding_controls.py)."""
    n, min_length = controls
    rows = tf.shape(allowed)[0]
    end_id = tf.cast(end_id, tf.int32)

    def banned():
        index, repeats = _ngram_completions(history, n)
        early = tf.fill([rows, 1], t < min_length)
        ends = tf.stack([tf.range(rows), tf.fill([rows], end_id)], -1)
        index = tf.concat([index, ends[:, None]], 1)
        ban = tf.where(tf.concat([repeats, early], 1), -float("inf"), float("inf"))
        masked = tf.tensor_scatter_nd_min(allowed, tf.reshape(index, [-1, 2]), tf.reshape(ban, [-1]))
        return tf.cond(t < min_length, lambda: _end_if_nothing_left(masked, allowed, end_id),
                       lambda: masked)
    return tf.cond((n > 0) | (t < min_length), banned, lambda: allowed)


def _end_if_nothing_left(masked, allowed, end_id):
    """Rows the bans left without a token get their <end> back: the caption ends rather than
    emit <pad> (argmax of all -inf) or whatever a categorical draw over nothing returns. Only
    while min_length bans <end>: otherwise <end> is never banned (no live hypothesis has it
    in its history), so a row always keeps it."""
    rows = tf.shape(masked)[0]
    stuck = tf.equal(tf.reduce_max(masked, -1), -float("inf"))
    ends = tf.stack([tf.range(rows), tf.fill([rows], end_id)], -1)
    value = tf.where(stuck, tf.gather(allowed, end_id, axis=1), tf.gather(masked, end_id, axis=1))
    return tf.tensor_scatter_nd_update(masked, ends, value)


def _ngram_completions(history, n):
    """Where repeating an n-gram would start: -> index [R, t, 2] (row, history[row, q]) and
    repeats bool [R, t], true where the token at q completes, after the history's last n - 1
    tokens, an n-gram already in the history (n <= 0: nowhere; n = 1: every q).

    Vectorised, no loop over earlier positions: the token at q is banned when the n - 1 tokens
    before it equal the history's last n - 1 tokens. The window before every q is gathered at
    once ([R, t, n-1]) and compared with that suffix: R * t * (n-1) compares a step."""
    rows, length = tf.shape(history)[0], tf.shape(history)[1]
    back = tf.range(1, tf.maximum(n, 1))               # offsets of the n - 1 tokens before
    position = tf.range(length)
    # Indices before the start are clamped to a column put in front (so that a gather from an
    # empty history is valid); what it holds never decides a ban: position >= n - 1 below
    # keeps only windows that lie wholly inside the history, and then so does the suffix.
    padded = tf.pad(history, [[0, 0], [1, 0]])
    before = lambda i: tf.maximum(i, -1) + 1
    window = tf.gather(padded, before(position[:, None] - back), axis=1)   # [R, t, n-1]
    suffix = tf.gather(padded, before(length - back), axis=1)              # [R, n-1]
    repeats = (tf.reduce_all(tf.equal(window, suffix[:, None]), -1)
               & (position >= n - 1)[None] & (n > 0))
    index = tf.stack([tf.broadcast_to(tf.range(rows)[:, None], [rows, length]), history], -1)
    return index, repeats


# ----------------------------------------------------------------------------------- helpers
def forbidden(vocab_size, start_id):
    """[V] float32: -inf at <pad> and <start> (never a word to emit), 0 elsewhere."""
    ids = tf.range(vocab_size)
    never = tf.equal(ids, PAD_ID) | tf.equal(ids, tf.cast(start_id, tf.int32))
    return tf.where(never, -float("inf"), 0.0)


def pick(log_probs, words):
    """log_probs [..., V], words [...] -> log_probs[..., words]."""
    return tf.gather(log_probs, words, batch_dims=words.shape.rank)


def relaxed(loop_vars, state_invariants):
    """Shape invariants: batch, beam and time dims may change from step to step (tokens and
    attention grow by one step; a tensor beam size leaves the beam dim unknown). The decoder
    state (the one tuple among loop_vars) takes the decoder's own `state_invariants`.
    Attention ([..., P] float32, rank >= 3) keeps its positions dim."""
    def relax(x):
        if x.shape.rank >= 3 and x.dtype == tf.float32:
            return tf.TensorShape([None] * (x.shape.rank - 1) + x.shape[-1:])
        return tf.TensorShape([None] * x.shape.rank)
    return tuple(state_invariants if isinstance(v, tuple) else relax(v) for v in loop_vars)
