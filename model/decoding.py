"""Caption decoding: greedy, beam search and sampling, each one tf.while_loop in the graph.

    out = decode(model, features, max_length, beam_size=3)        # front door (export uses it)
    out = greedy(model, features, max_length)
    out = beam_search(model, features, beam_size, max_length, length_penalty_alpha=0.7)
    out = sample(model, features, max_length, temperature=1.0, seed=42)

features: [B, P, F] (float16/32), B dynamic. max_length, beam_size, length_penalty_alpha,
temperature and seed may be Python numbers or scalar tensors: one trace of a tf.function with
input_signature [None, P, F] serves every batch size, max_length and beam size. An empty batch
or max_length 0 gives empty captions (T = 0).

Every function returns a `Decoded`; fields (T <= max_length: the longest caption returned, all
k hypotheses counted for beams, so `tokens` may end in columns of 0):
    tokens            [B, T] int32    the caption without <start>; ends with <end> where it
                                      ended (a caption cut at max_length has none); 0 after
    scores            [B] float32     its log-probability under the model: the sum of the
                                      chosen tokens' log_softmax, <end> included
    normalized_scores [B] float32     scores / length_penalty(lengths) (what beams rank by)
    attention         [B, T, P] float32  the attention weights that produced each token; each
                                      row of a generated token sums to 1, rows after it are 0
    lengths           [B] int32       generated tokens, <end> included
    beam_tokens       [B, k, T]       all k hypotheses, best first (greedy/sample: k = 1)
    beam_scores       [B, k]          their raw log-probabilities
    beam_normalized_scores [B, k]     their ranking scores, non-increasing along k
    beam_lengths      [B, k]

Length normalisation (GNMT, Wu et al. 2016): a hypothesis of n tokens (<end> included) with
log-probability s ranks by s / lp(n), lp(n) = ((5 + n) / 6) ** alpha. alpha = 0 ranks by raw
log-probability (which favours short captions); larger alpha favours longer ones. Greedy and
sampling report normalized_scores with alpha = DEFAULT_ALPHA, for comparison only.

Tokens that are never a word, <pad> and <start>, are never chosen (so 0 in `tokens` always
means "after the end"); they still count in the softmax that scores are taken from.

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

The recurrent state comes from model.init_state (per-image work, once) and model.step. The
beams of an image share its encoded features and attention keys: they are tiled k times once
and never reordered; only the GRU state is gathered by beam parent each step.
"""
import collections

import tensorflow as tf

from caption_io.vocab import END_ID, PAD_ID, START_ID

DEFAULT_ALPHA = 0.7

# DecoderState fields that hold per-image values, identical across the beams of an image:
# reordering beams within an image leaves them unchanged, so the per-step gather skips them
# ([B*k, 64, 512] keys would otherwise be copied at every word).
_PER_IMAGE_FIELDS = ("features", "keys")

Decoded = collections.namedtuple("Decoded", [
    "tokens", "scores", "normalized_scores", "attention", "lengths",
    "beam_tokens", "beam_scores", "beam_normalized_scores", "beam_lengths"])


def length_penalty(lengths, alpha):
    """GNMT's lp(n) = ((5 + n) / 6) ** alpha, float32."""
    n = tf.cast(lengths, tf.float32)
    return tf.pow((5.0 + n) / 6.0, tf.cast(alpha, tf.float32))


# ---------------------------------------------------------------------------------- front door
def decode(model, features, max_length, beam_size=1, length_penalty_alpha=DEFAULT_ALPHA,
           start_id=START_ID, end_id=END_ID):
    """Greedy for beam_size 1, beam search above (beam search with k = 1 gives the same
    result; greedy's loop is just leaner). A tensor beam_size picks with tf.cond at run time
    (both loops traced once), so an exported signature can take it as an input."""
    if isinstance(beam_size, int):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if beam_size == 1:
            return greedy(model, features, max_length, start_id, end_id,
                          length_penalty_alpha=length_penalty_alpha)
        return beam_search(model, features, beam_size, max_length, length_penalty_alpha,
                           start_id, end_id)
    beam_size = tf.convert_to_tensor(beam_size, tf.int32)
    check = tf.debugging.assert_positive(beam_size, message="beam_size must be >= 1")
    with tf.control_dependencies([check]):
        beam_size = tf.identity(beam_size)
    return tf.cond(
        beam_size <= 1,
        lambda: greedy(model, features, max_length, start_id, end_id,
                       length_penalty_alpha=length_penalty_alpha),
        lambda: beam_search(model, features, beam_size, max_length, length_penalty_alpha,
                            start_id, end_id))


# ---------------------------------------------------------------------------- greedy, sampling
def greedy(model, features, max_length, start_id=START_ID, end_id=END_ID,
           length_penalty_alpha=DEFAULT_ALPHA):
    """The most likely next word at each step."""
    def choose(t, logits, allowed_log_probs):
        del t, logits
        return tf.argmax(allowed_log_probs, -1, output_type=tf.int32)
    return _one_path(model, features, max_length, choose, start_id, end_id,
                     length_penalty_alpha)


def sample(model, features, max_length, temperature=1.0, seed=None, start_id=START_ID,
           end_id=END_ID, length_penalty_alpha=DEFAULT_ALPHA):
    """Each word drawn from softmax(logits / temperature) (the tutorial's decoding).

    seed: an int, or an int scalar or [2] tensor; the same seed gives the same captions
    (stateless RNG: step t draws with fold_in(seed, t)). None draws a fresh seed.
    temperature <= 0 means argmax (greedy); -> 0 approaches it. scores stay the model's
    log-probabilities (log_softmax of the untempered logits), whatever the temperature.
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros_like(seed)])
    temperature = tf.cast(temperature, tf.float32)

    def choose(t, logits, allowed_log_probs):
        # Forbidden tokens are -inf in allowed_log_probs: keep them so in the tempered logits.
        scaled = tf.where(tf.math.is_inf(allowed_log_probs), allowed_log_probs,
                          logits / tf.maximum(temperature, 1e-30))
        drawn = tf.random.stateless_categorical(
            scaled, 1, seed=tf.random.experimental.stateless_fold_in(seed, t),
            dtype=tf.int32)[:, 0]
        greedy_word = tf.argmax(allowed_log_probs, -1, output_type=tf.int32)
        return tf.where(temperature > 0, drawn, greedy_word)
    return _one_path(model, features, max_length, choose, start_id, end_id,
                     length_penalty_alpha)


def _one_path(model, features, max_length, choose, start_id, end_id, alpha):
    """One hypothesis per image; choose(t, logits, allowed_log_probs) -> next words [B]."""
    max_length = tf.convert_to_tensor(max_length, tf.int32)
    state = model.init_state(features)
    batch = tf.shape(features)[0]
    positions = features.shape[1]
    forbidden = _forbidden(model.config.vocab_size, start_id)

    def body(t, state, words, ended, scores, lengths, tokens, attention):
        logits, state, alpha_t = model.step(state, words)
        logits = tf.cast(logits, tf.float32)
        log_probs = tf.nn.log_softmax(logits)
        chosen = choose(t, logits, log_probs + forbidden)
        live = tf.logical_not(ended)
        scores += tf.where(live, _pick(log_probs, chosen), 0.0)
        lengths += tf.cast(live, tf.int32)
        chosen = tf.where(live, chosen, PAD_ID)
        alpha_t = tf.where(live[:, None], tf.cast(alpha_t, tf.float32), 0.0)
        return (t + 1, state, chosen, ended | tf.equal(chosen, end_id), scores, lengths,
                tf.concat([tokens, chosen[:, None]], 1),
                tf.concat([attention, alpha_t[:, None]], 1))

    loop_vars = (tf.constant(0), state, tf.fill([batch], tf.cast(start_id, tf.int32)),
                 tf.zeros([batch], tf.bool), tf.zeros([batch]), tf.zeros([batch], tf.int32),
                 tf.zeros([batch, 0], tf.int32), tf.zeros([batch, 0, positions]))
    _, _, _, _, scores, lengths, tokens, attention = tf.while_loop(
        lambda t, _s, _w, ended, *_: tf.logical_and(t < max_length,
                                                    tf.logical_not(tf.reduce_all(ended))),
        body, loop_vars, shape_invariants=_relaxed(loop_vars), maximum_iterations=max_length)
    normalized = scores / length_penalty(lengths, alpha)
    return Decoded(tokens, scores, normalized, attention, lengths, tokens[:, None],
                   scores[:, None], normalized[:, None], lengths[:, None])


# ------------------------------------------------------------------------------- beam search
def beam_search(model, features, beam_size, max_length, length_penalty_alpha=DEFAULT_ALPHA,
                start_id=START_ID, end_id=END_ID):
    """The k best captions by normalised score (see the module docstring)."""
    k = tf.convert_to_tensor(beam_size, tf.int32)
    max_length = tf.convert_to_tensor(max_length, tf.int32)
    alpha = tf.cast(length_penalty_alpha, tf.float32)
    batch = tf.shape(features)[0]
    positions = features.shape[1]
    vocab = model.config.vocab_size
    forbidden = _forbidden(vocab, start_id)
    neg_inf = tf.constant(-float("inf"))
    image_rows = k * tf.range(batch)[:, None]              # beam j of image b: row b * k + j

    state = tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), model.init_state(features))
    # All k beams start identical: only beam 0 may expand at the first step.
    alive_scores = tf.tile(tf.where(tf.range(k) == 0, 0.0, neg_inf)[None], [batch, 1])

    def body(t, done, state, words, alive_tokens, alive_att, alive_scores,
             fin_tokens, fin_att, fin_scores, fin_norm, fin_lengths):
        logits, state, att = model.step(state, tf.reshape(words, [-1]))
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32)) + forbidden
        log_probs = tf.reshape(log_probs, [batch, k, vocab])
        att = tf.reshape(tf.cast(att, tf.float32), [batch, k, positions])

        # The k best one-token extensions of the live beams (empty beams are at -inf).
        flat = tf.reshape(alive_scores[:, :, None] + log_probs, [batch, k * vocab])
        cand_scores, index = tf.math.top_k(flat, k)
        parent, words = index // vocab, index % vocab
        cand_tokens = tf.concat([tf.gather(alive_tokens, parent, batch_dims=1),
                                 words[:, :, None]], 2)
        cand_att = tf.concat([tf.gather(alive_att, parent, batch_dims=1),
                              tf.gather(att, parent, batch_dims=1)[:, :, None]], 2)
        length = t + 1
        last = length >= max_length
        ended = tf.equal(words, end_id)
        real = cand_scores > neg_inf

        # Finished set: the k best of the old set and the candidates that ended now (all
        # of them at max_length). Images already done take none.
        finishing = (ended | last) & real & tf.logical_not(done)[:, None]
        cand_norm = tf.where(finishing, cand_scores / length_penalty(length, alpha), neg_inf)
        fin_norm, chosen = tf.math.top_k(tf.concat([fin_norm, cand_norm], 1), k)
        pool = lambda old, new: tf.gather(tf.concat([old, new], 1), chosen, batch_dims=1)
        fin_tokens = pool(tf.pad(fin_tokens, [[0, 0], [0, 0], [0, 1]]), cand_tokens)
        fin_att = pool(tf.pad(fin_att, [[0, 0], [0, 0], [0, 1], [0, 0]]), cand_att)
        fin_scores = pool(fin_scores, cand_scores)
        fin_lengths = pool(fin_lengths, tf.fill(tf.shape(cand_scores), length))

        # Live beams: the candidates that did not end (an ended one leaves its slot empty).
        alive_scores = tf.where(ended, neg_inf, cand_scores)
        state = state._replace(**{
            name: tf.gather(value, tf.reshape(parent + image_rows, [-1]))
            for name, value in state._asdict().items() if name not in _PER_IMAGE_FIELDS})

        # Done: the finished set is full and its worst beats anything a live beam can reach.
        best = tf.reduce_max(alive_scores, 1)
        reachable = tf.maximum(best / length_penalty(length + 1, alpha),
                               best / length_penalty(max_length, alpha))
        worst = fin_norm[:, -1]
        done = done | last | tf.equal(best, neg_inf) | ((worst > neg_inf) & (worst >= reachable))
        return (t + 1, done, state, words, cand_tokens, cand_att, alive_scores,
                fin_tokens, fin_att, fin_scores, fin_norm, fin_lengths)

    empty = tf.fill([batch, k], neg_inf)
    loop_vars = (tf.constant(0), tf.zeros([batch], tf.bool), state,
                 tf.fill([batch, k], tf.cast(start_id, tf.int32)),
                 tf.zeros([batch, k, 0], tf.int32), tf.zeros([batch, k, 0, positions]),
                 alive_scores, tf.zeros([batch, k, 0], tf.int32),
                 tf.zeros([batch, k, 0, positions]), empty, empty, tf.zeros([batch, k], tf.int32))
    out = tf.while_loop(
        lambda t, done, *_: tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done))),
        body, loop_vars, shape_invariants=_relaxed(loop_vars), maximum_iterations=max_length)
    fin_tokens, fin_att, fin_scores, fin_norm, fin_lengths = out[7:]
    # Trim the steps run past the longest hypothesis returned (spent proving it the best).
    steps = tf.reduce_max(tf.concat([tf.reshape(fin_lengths, [-1]), [0]], 0))
    fin_tokens, fin_att = fin_tokens[:, :, :steps], fin_att[:, :, :steps]
    return Decoded(fin_tokens[:, 0], fin_scores[:, 0], fin_norm[:, 0], fin_att[:, 0],
                   fin_lengths[:, 0], fin_tokens, fin_scores, fin_norm, fin_lengths)


# ----------------------------------------------------------------------------------- helpers
def _forbidden(vocab_size, start_id):
    """[V] float32: -inf at <pad> and <start> (never a word to emit), 0 elsewhere."""
    ids = tf.range(vocab_size)
    never = tf.equal(ids, PAD_ID) | tf.equal(ids, tf.cast(start_id, tf.int32))
    return tf.where(never, -float("inf"), 0.0)


def _pick(log_probs, words):
    """log_probs [..., V], words [...] -> log_probs[..., words]."""
    return tf.gather(log_probs, words, batch_dims=words.shape.rank)


def _relaxed(loop_vars):
    """Shape invariants: batch, beam and time dims may change from step to step (tokens and
    attention grow by one step; a tensor beam size leaves the beam dim unknown). The decoder
    state (a namedtuple) only relaxes its batch dim: the cell reads its static feature dims.
    Attention ([..., P] float32, rank >= 3) keeps its positions dim."""
    def relax(x):
        if x.shape.rank >= 3 and x.dtype == tf.float32:
            return tf.TensorShape([None] * (x.shape.rank - 1) + x.shape[-1:])
        return tf.TensorShape([None] * x.shape.rank)
    return tuple(
        tf.nest.map_structure(lambda x: tf.TensorShape([None]) + x.shape[1:], v)
        if isinstance(v, tuple) else relax(v)
        for v in loop_vars)
