"""Beam search: the k best captions of each image by normalised score, one tf.while_loop in
the graph (model.decoding.beam_search and decode call it; model.decoded has what it returns).

Beam search (k beams) keeps finished hypotheses aside. Each step takes the k best one-token
extensions of the live beams; those ending with <end> leave the beam for a finished set of k,
ranked by normalised score, and are never extended again (their slot is empty for that step;
the next step's k best extensions of the remaining beams fill the beam again). An image is
done when its finished set is full and its worst member beats the best score any live beam
could still reach, or when no live beam is left. Log-probabilities only fall as a hypothesis
grows, so that bound is s_best / lp(n) at the length n (from the next one to max_length) that
favours it most. At max_length the live beams join the finished set unended, so k hypotheses
always come back. The loop stops once every image is done. With k = 1 this is exactly greedy
decoding (same tokens, same score), whatever alpha.

The decoder state is tiled k times once; each step the decoder's `reorder` gathers it by beam
parent (what is per image, like the encoded grid, it leaves in place).
"""
from typing import NamedTuple

import tensorflow as tf

from model.decoded import Beam, Decoded, Hypotheses, length_penalty
from model.decoding_steps import apply_controls, forbidden, relaxed

NEG_INF = -float("inf")  # the score of an empty beam slot or finished place


def search(model, features, beam_size, max_length, alpha, start_id, end_id, num_captions, controls) -> Decoded:
    """Beam search with checked arguments: num_captions a checked int or int32 tensor,
    controls a decoding_steps.Controls or None."""
    k = tf.convert_to_tensor(beam_size, tf.int32)
    max_length = tf.convert_to_tensor(max_length, tf.int32)
    parts = loop_parts(model, features, k, tf.shape(features)[0], max_length, alpha, start_id, end_id, controls)
    out = tf.while_loop(parts.cond, parts.body, parts.variables,
                        shape_invariants=relaxed(parts.variables, parts.state_invariants),
                        maximum_iterations=max_length)
    return _result(finished(out), num_captions)


class LoopParts(NamedTuple):
    """The search's tf.while_loop, not yet run: what loop_parts returns."""

    variables: tuple        # before the first word: t, done, the decoder state, ... (see _start)
    body: object            # one step: every live beam one word longer
    cond: object            # (variables) -> whether any image still searches
    state_invariants: object  # the decoder state's shape invariants (model.state_invariants)


def loop_parts(model, features, k, batch, max_length, alpha, start_id, end_id, controls=None) -> LoopParts:
    """The search's loop for `batch` images, unrun: search() runs it with every shape left open;
    a caller that knows its shapes (caption_serving/litert.py: one image, a fixed k) runs the same
    loop with its own invariants. `finished` reads the result from the loop's output.

    k, batch and max_length: ints or int32 scalars; controls a decoding_steps.Controls or None."""
    state = tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), model.init_state(features))
    positions = features.shape[1]
    alpha = tf.cast(alpha, tf.float32)
    return LoopParts(
        variables=_start(state, k, batch, positions, start_id),
        body=_step(model, k, batch, positions, max_length, alpha, start_id, end_id, controls),
        cond=lambda t, done, *_: tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done))),
        state_invariants=model.state_invariants(state))


def finished(loop_output) -> Hypotheses:
    """The finished set from the loop's output: the fields after t, done, the decoder state, the
    last words and the live beams' tokens, attention and scores."""
    return Hypotheses(*loop_output[7:])


def _start(state, k, batch, positions, start_id) -> tuple:
    """The loop's variables before the first word: t, done, the decoder state, the last words,
    the live beams (tokens, attention, scores) and the finished set (a Hypotheses' fields)."""
    # All k beams start identical: only beam 0 may expand at the first step.
    alive_scores = tf.tile(tf.where(tf.range(k) == 0, 0.0, NEG_INF)[None], [batch, 1])
    empty = tf.fill([batch, k], NEG_INF)
    return (tf.constant(0), tf.zeros([batch], tf.bool), state,
            tf.fill([batch, k], tf.cast(start_id, tf.int32)),
            tf.zeros([batch, k, 0], tf.int32), tf.zeros([batch, k, 0, positions]), alive_scores,
            *Hypotheses(tokens=tf.zeros([batch, k, 0], tf.int32), scores=empty, normalized_scores=empty,
                        attention=tf.zeros([batch, k, 0, positions]), lengths=tf.zeros([batch, k], tf.int32)))


def _step(model, k, batch, positions, max_length, alpha, start_id, end_id, controls):
    """The loop's body: every live beam one word longer, the finished set and `done` updated."""
    vocab = model.config.vocab_size
    never = forbidden(vocab, start_id)
    image_rows = k * tf.range(batch)[:, None]              # beam j of image b: row b * k + j

    def body(t, done, state, words, alive_tokens, alive_att, alive_scores, *finished):
        logits, state, att = model.step(state, tf.reshape(words, [-1]))
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32)) + never
        if controls is not None:
            log_probs = apply_controls(log_probs, tf.reshape(alive_tokens, [batch * k, -1]), t,
                                       controls, end_id)
        log_probs = tf.reshape(log_probs, [batch, k, vocab])
        att = tf.reshape(tf.cast(att, tf.float32), [batch, k, positions])
        cand_scores, parent, words, cand_tokens, cand_att = _extensions(
            alive_scores, log_probs, att, alive_tokens, alive_att, k)
        length = t + 1
        last = length >= max_length
        ended = tf.equal(words, end_id)
        finished = _finish(Hypotheses(*finished), Hypotheses(cand_tokens, cand_scores, None, cand_att, length),
                           (ended | last) & tf.logical_not(done)[:, None], alpha, k)
        # Live beams: the candidates that did not end (an ended one leaves its slot empty).
        alive_scores = tf.where(ended, NEG_INF, cand_scores)
        state = model.reorder(state, tf.reshape(parent + image_rows, [-1]))
        done = _done(done, last, alive_scores, finished.normalized_scores[:, -1], length, max_length, alpha)
        return (t + 1, done, state, words, cand_tokens, cand_att, alive_scores, *finished)
    return body


def _extensions(alive_scores, log_probs, att, alive_tokens, alive_att, k):
    """The k best one-token extensions of the live beams (empty beams are at -inf) ->
    (their scores, parent beams, words, tokens and attention rows so far)."""
    vocab = log_probs.shape[-1]
    flat = tf.reshape(alive_scores[:, :, None] + log_probs, [tf.shape(log_probs)[0], k * vocab])
    cand_scores, index = tf.math.top_k(flat, k)
    parent, words = index // vocab, index % vocab
    cand_tokens = tf.concat([tf.gather(alive_tokens, parent, batch_dims=1), words[:, :, None]], 2)
    cand_att = tf.concat([tf.gather(alive_att, parent, batch_dims=1),
                          tf.gather(att, parent, batch_dims=1)[:, :, None]], 2)
    return cand_scores, parent, words, cand_tokens, cand_att


def _finish(finished: Hypotheses, candidates: Hypotheses, ending, alpha, k) -> Hypotheses:
    """The finished set after a step: the k best by normalised score of the old set and the
    candidates that end now (`ending`: <end>, or all at max_length; images already done take
    none). candidates: their tokens, scores and attention, and their length (a scalar)."""
    length = candidates.lengths
    finishing = ending & (candidates.scores > NEG_INF)
    cand_norm = tf.where(finishing, candidates.scores / length_penalty(length, alpha), NEG_INF)
    normalized, chosen = tf.math.top_k(tf.concat([finished.normalized_scores, cand_norm], 1), k)
    pool = lambda old, new: tf.gather(tf.concat([old, new], 1), chosen, batch_dims=1)
    return Hypotheses(
        tokens=pool(tf.pad(finished.tokens, [[0, 0], [0, 0], [0, 1]]), candidates.tokens),
        attention=pool(tf.pad(finished.attention, [[0, 0], [0, 0], [0, 1], [0, 0]]), candidates.attention),
        scores=pool(finished.scores, candidates.scores), normalized_scores=normalized,
        lengths=pool(finished.lengths, tf.fill(tf.shape(candidates.scores), length)))


def _done(done, last, alive_scores, worst, length, max_length, alpha):
    """Done: the finished set is full and its worst beats anything a live beam can reach (or
    this was the last step, or no live beam is left)."""
    best = tf.reduce_max(alive_scores, 1)
    reachable = tf.maximum(best / length_penalty(length + 1, alpha),
                           best / length_penalty(max_length, alpha))
    return done | last | tf.equal(best, NEG_INF) | ((worst > NEG_INF) & (worst >= reachable))


def _result(finished: Hypotheses, num_captions) -> Decoded:
    """The finished set, best first, as a Decoded: the first hypothesis, all k, the first K."""
    # Trim the steps run past the longest hypothesis returned (spent proving it the best).
    steps = tf.reduce_max(tf.concat([tf.reshape(finished.lengths, [-1]), [0]], 0))
    finished = finished._replace(tokens=finished.tokens[:, :, :steps], attention=finished.attention[:, :, :steps])
    return Decoded.of(best=Hypotheses(*(x[:, 0] for x in finished)), beam=Beam.of(finished),
                      nbest=_nbest(finished, num_captions))


def _nbest(finished: Hypotheses, count) -> Hypotheses:
    """The first `count` of the best-first finished set, T trimmed to the longest of them.

    A place no hypothesis filled is already blank (tokens and attention 0, length 0, scores
    -inf): it starts so, and when the set is re-ranked each step, top_k puts the lower index
    first among equal values (documented), so the -inf places kept are always the old set's
    blank ones, never a candidate's (whose tokens and raw score are real)."""
    lengths = finished.lengths[:, :count]
    steps = tf.reduce_max(tf.concat([tf.reshape(lengths, [-1]), [0]], 0))
    return Hypotheses(finished.tokens[:, :count, :steps], finished.scores[:, :count],
                      finished.normalized_scores[:, :count], finished.attention[:, :count, :steps], lengths)
