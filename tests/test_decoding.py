"""Tests of model/decoding.py: greedy, beam search and sampling against hand-made references.

Three kinds of model: a small random-weight Captioner (arbitrary, diverse distributions), the
same trained on the copy task of test_model (confident, meaningful captions), and a Markov
chain over words with the init_state / step API, whose caption probabilities are known exactly
(for the cases beam search must get right, and to count decode steps).
"""
import types

import numpy as np
import pytest
import tensorflow as tf

from model import GRUState, decoders, decoding
from tests.test_model import F, P, V, copy_task, make_model, train_on_copy_task

PAD, START, END = 0, 2, 3


def random_features(batch, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.standard_normal((batch, P, F)).astype(np.float16))


@pytest.fixture(scope="module")
def random_model():
    return make_model(seed=1)


@pytest.fixture(scope="module")
def copy_model():
    """test_model's copy task, trained the same way: captions <start> s f s <end>."""
    return train_on_copy_task(make_model, 400, 3e-3)[0]


class MarkovModel:
    """log p(next | previous word) from a table, ignoring the image; counts its steps."""

    def __init__(self, transitions, floor=1e-12):
        """floor: the probability of every transition not listed; 0 makes them impossible
        (log-probability -inf), and then a word without transitions is followed by any word."""
        table = np.full((V, V), floor)
        for prev, nexts in transitions.items():
            for word, p in nexts.items():
                table[prev, word] = p
        table[table.sum(1) == 0] = 1.0
        with np.errstate(divide="ignore"):
            self.table = tf.constant(np.log(table / table.sum(1, keepdims=True)), tf.float32)
        self.config = types.SimpleNamespace(vocab_size=V)
        self.steps = tf.Variable(0)

    def init_state(self, features):
        x = tf.cast(features, tf.float32)
        return GRUState(features=x, keys=x, hidden=tf.zeros([tf.shape(x)[0], 1]))

    def reorder(self, state, rows):
        return state._replace(hidden=tf.gather(state.hidden, rows))

    def state_invariants(self, state):
        return decoders.any_batch(state)

    def step(self, state, prev_tokens):
        self.steps.assign_add(1)
        attention = tf.nn.softmax(state.keys[:, :, 0])
        return tf.gather(self.table, prev_tokens), state._replace(hidden=state.hidden + 1), \
            attention


# ------------------------------------------------------------------------------ references
def hand_greedy(model, features, max_length, no_repeat_ngram=0, min_length=0):
    """Python step loop: argmax over words (never <pad> / <start>), stop at <end>. With the
    controls: no word that would repeat an n-gram of the caption so far, no <end> before
    min_length words, and <end> if that leaves nothing."""
    state = model.init_state(features)
    batch = features.shape[0]
    words = tf.fill([batch], START)
    tokens, scores = np.zeros((batch, max_length), np.int32), np.zeros(batch)
    ended = np.zeros(batch, bool)
    for t in range(max_length):
        logits, state, _ = model.step(state, words)
        log_probs = tf.nn.log_softmax(logits).numpy()
        choice = log_probs.copy()
        choice[:, [PAD, START]] = -np.inf
        for b in range(batch):
            before = choice[b].copy()
            choice[b, sorted(ngram_completions(list(tokens[b, :t]), no_repeat_ngram))] = -np.inf
            if t < min_length:
                choice[b, END] = -np.inf
            if np.all(choice[b] == -np.inf):
                choice[b, END] = before[END]
        words_np = choice.argmax(-1).astype(np.int32)
        for b in range(batch):
            if not ended[b]:
                tokens[b, t] = words_np[b]
                scores[b] += log_probs[b, words_np[b]]
                ended[b] = words_np[b] == END
        words = tf.constant(words_np)
    return tokens, scores


def ngram_completions(history, n):
    """The words w such that history + [w] ends with an n-gram already in history."""
    if n == 0:
        return set()
    t = len(history)
    return {history[q] for q in range(n - 1, t) if history[q - n + 1:q] == history[t - n + 1:t]}


def repeated_ngrams(row, length, n):
    """The n-grams that occur more than once in row[:length]."""
    grams = [tuple(row[i:i + n]) for i in range(length - n + 1)]
    return {g for g in grams if grams.count(g) > 1}


def teacher_forced_scores(model, features, tokens, lengths):
    """Sum of log_softmax of each caption's tokens, recomputed by model.teacher_forced on
    [<start>] + tokens. features [N, P, F], tokens [N, T], lengths [N]."""
    tokens = np.asarray(tokens)
    inputs = np.concatenate([np.full((len(tokens), 1), START), tokens], 1).astype(np.int32)
    logits, _ = model.teacher_forced(features, tf.constant(inputs))
    log_probs = tf.nn.log_softmax(logits).numpy()
    picked = np.take_along_axis(log_probs, tokens[:, :, None], 2)[:, :, 0]
    mask = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    return np.sum(picked * mask, 1)


def check_well_formed(out, max_length, end=END):
    """tokens end with <end> at lengths (or run to max_length), 0 after; attention rows sum
    to 1 where a token was generated, 0 after."""
    for tokens, lengths, attention in [(out.tokens, out.lengths, out.attention)] + (
            [(out.beam_tokens[:, j], out.beam_lengths[:, j], None)
             for j in range(out.beam_tokens.shape[1])]):
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        assert tokens.shape[1] <= max_length
        for row, n in zip(tokens, lengths):
            assert 1 <= n <= max_length
            assert np.all(row[n:] == PAD) and np.all(row[:n] != PAD)
            assert row[n - 1] == end or n == max_length
            assert end not in row[:n - 1]                     # nothing after an <end>
        if attention is not None:
            sums = np.asarray(tf.reduce_sum(attention, -1))
            real = np.arange(tokens.shape[1])[None] < lengths[:, None]
            np.testing.assert_allclose(sums[real], 1.0, atol=1e-5)
            assert np.all(sums[~real] == 0)


# ------------------------------------------------------------------------------------ greedy
def test_greedy_equals_hand_step_loop(random_model):
    features = random_features(5)
    out = tf.function(lambda f: decoding.greedy(random_model, f, 8))(features)
    tokens, scores = hand_greedy(random_model, features, 8)
    np.testing.assert_array_equal(out.tokens, tokens[:, :out.tokens.shape[1]])
    assert np.all(tokens[:, out.tokens.shape[1]:] == PAD)
    np.testing.assert_allclose(out.scores, scores, atol=1e-4)
    check_well_formed(out, 8)
    np.testing.assert_allclose(out.normalized_scores,
                               out.scores / ((5 + out.lengths.numpy()) / 6) ** 0.7, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(gate=True), dict(compute_dtype="bfloat16")])
def test_other_configs_decode(kw):
    # The context gate and bf16 (hidden state in bf16, logits and attention in float32).
    model = make_model(seed=2, **kw)
    features = random_features(3)
    out = tf.function(lambda f: decoding.greedy(model, f, 6))(features)
    tokens, scores = hand_greedy(model, features, 6)
    np.testing.assert_array_equal(out.tokens, tokens[:, :out.tokens.shape[1]])
    # bf16: graph and eager round differently (oneDNN fuses differently).
    np.testing.assert_allclose(out.scores, scores, atol=0.05 if kw.get("compute_dtype") else 1e-4)
    beam = tf.function(lambda f: decoding.beam_search(model, f, 3, 6))(features)
    check_well_formed(beam, 6)
    assert np.all(np.diff(beam.beam_normalized_scores.numpy(), axis=1) <= 0)
    np.testing.assert_array_equal(decoding.beam_search(model, features, 1, 6).tokens, out.tokens)


def test_greedy_on_copy_task_stops_when_all_ended(copy_model):
    features, caps = copy_task(64, np.random.default_rng(7))
    out = decoding.greedy(copy_model, tf.constant(features), 20)
    assert out.tokens.shape == (64, 4)                  # s f s <end>: 4 steps, not 20
    assert np.mean(np.all(out.tokens.numpy() == caps[:, 1:], 1)) >= 0.9
    check_well_formed(out, 20)


def test_loops_stop_when_every_caption_has_ended():
    # <start> -> 4 -> <end> is everyone's greedy caption: two steps, whatever max_length.
    model = MarkovModel({START: {4: 0.9, 5: 0.1}, 4: {END: 0.9, 6: 0.1},
                         5: {END: 0.8, 6: 0.2}, 6: {END: 1.0}})
    features = random_features(3)
    for run, steps, best in [
            (lambda: decoding.greedy(model, features, 50), 2, [4, END]),
            (lambda: decoding.sample(model, features, 50, 1e-3, seed=1), 2, [4, END]),
            (lambda: decoding.beam_search(model, features, 1, 50, 0.0), 2, [4, END]),
            # k = 2: [4 <end>] (.81) finishes at step 2, [4 6 <end>] (.09) at step 3 and
            # fills the set; no live beam is left above it: done.
            (lambda: decoding.beam_search(model, features, 2, 50, 0.0), 3, [4, END, 0])]:
        model.steps.assign(0)
        out = tf.function(run)()
        assert int(model.steps.numpy()) == steps
        np.testing.assert_array_equal(out.tokens, [best] * 3)     # T = 2 or 3, not 50


# ------------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_beam_size_one_equals_greedy(random_model, copy_model, alpha):
    for model, features in [(random_model, random_features(6)),
                            (copy_model, tf.constant(copy_task(16, np.random.default_rng(3))[0]))]:
        greedy = decoding.greedy(model, features, 9, length_penalty_alpha=alpha)
        beam = decoding.beam_search(model, features, 1, 9, length_penalty_alpha=alpha)
        np.testing.assert_array_equal(beam.tokens, greedy.tokens)
        np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)
        np.testing.assert_allclose(beam.normalized_scores, greedy.normalized_scores, atol=1e-5)
        np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-6)
        np.testing.assert_array_equal(beam.lengths, greedy.lengths)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beams_sorted_and_scores_are_teacher_forced_log_probs(random_model, alpha):
    features = random_features(4, seed=2)
    k, max_length = 4, 7
    out = tf.function(lambda f: decoding.beam_search(random_model, f, k, max_length, alpha))(
        features)
    check_well_formed(out, max_length)
    norm = out.beam_normalized_scores.numpy()
    assert out.beam_tokens.shape[:2] == (4, k)
    assert np.all(np.isfinite(norm))
    assert np.all(np.diff(norm, axis=1) <= 0)                        # best first
    lengths = out.beam_lengths.numpy()
    np.testing.assert_allclose(norm, out.beam_scores / ((5 + lengths) / 6) ** alpha, rtol=1e-5)
    # Each hypothesis' raw score is its log-probability, recomputed with teacher forcing.
    tokens = out.beam_tokens.numpy().reshape(4 * k, -1)
    recomputed = teacher_forced_scores(random_model, tf.repeat(features, k, 0), tokens,
                                       lengths.reshape(-1))
    np.testing.assert_allclose(out.beam_scores.numpy().reshape(-1), recomputed, atol=1e-4)
    # The hypotheses of an image are distinct, and the best one is the `tokens` output.
    for b in range(4):
        assert len({tuple(row) for row in out.beam_tokens.numpy()[b]}) == k
    np.testing.assert_array_equal(out.tokens, out.beam_tokens[:, 0])
    np.testing.assert_array_equal(out.scores, out.beam_scores[:, 0])
    # Attention of the best hypothesis = what teacher forcing gives on its tokens.
    first = np.arange(4) * k
    inputs = np.concatenate([np.full((4, 1), START), tokens[first]], 1).astype(np.int32)
    _, attention = random_model.teacher_forced(features, tf.constant(inputs))
    real = np.arange(tokens.shape[1])[None] < lengths[:, 0][:, None]
    np.testing.assert_allclose(out.attention.numpy()[real], attention.numpy()[real], atol=1e-5)


def test_beam_search_on_copy_task(copy_model):
    features, caps = copy_task(32, np.random.default_rng(5))
    features = tf.constant(features)
    out = decoding.beam_search(copy_model, features, 3, 20)
    check_well_formed(out, 20)
    # T is the longest of all 3 hypotheses (the 2nd and 3rd may be longer than the best).
    padded = np.pad(caps[:, 1:], [[0, 0], [0, out.tokens.shape[1] - 4]])
    assert np.mean(np.all(out.tokens.numpy() == padded, 1)) >= 0.9
    greedy = decoding.greedy(copy_model, features, 20)
    assert np.all(out.scores.numpy() >= greedy.scores.numpy() - 1e-5)   # no worse here
    tokens = out.beam_tokens.numpy().reshape(32 * 3, -1)
    recomputed = teacher_forced_scores(copy_model, tf.repeat(features, 3, 0), tokens,
                                       out.beam_lengths.numpy().reshape(-1))
    np.testing.assert_allclose(out.beam_scores.numpy().reshape(-1), recomputed, atol=1e-4)


def test_finished_hypothesis_kept_aside_while_live_beams_go_on():
    # [<end>] (p .35) finishes at step 1. The live beams go on: <start> 4 (.55), then the
    # chain 4 -> 5 (.8) -> 6 (.8) -> 5 ... which never ends before max_length, and they
    # outscore the finished one until step 3 (.55 * .8 * .8 = .352). By raw log-probability
    # [<end>] beats every longer caption, so it must come back first: kept aside, neither
    # extended nor dropped while the live beams continue.
    chain = {START: {4: 0.55, END: 0.35, 7: 0.1}, 4: {5: 0.8, 7: 0.2}, 5: {6: 0.8, 7: 0.2},
             6: {5: 0.8, 7: 0.2}, 7: {8: 1.0}, 8: {7: 1.0}}
    model = MarkovModel(chain)
    features = random_features(2)
    out = decoding.beam_search(model, features, 2, 6, 0.0)
    np.testing.assert_array_equal(out.tokens, [[END, 0, 0, 0, 0, 0]] * 2)
    np.testing.assert_allclose(out.scores, np.log(0.35), atol=1e-5)
    # Second: the chain cut at max_length (.55 * .8^5 = .18 > .11 of <4 7 8 7 8 7>).
    np.testing.assert_array_equal(out.beam_tokens[:, 1], [[4, 5, 6, 5, 6, 5]] * 2)
    np.testing.assert_allclose(out.beam_scores[:, 1], np.log(0.55 * 0.8 ** 5), atol=1e-5)
    assert list(out.beam_lengths.numpy()[0]) == [1, 6]
    # With alpha = 1 the chain ranks first (log .18 / (11 / 6) = -.94 > log .35 = -1.05),
    # and the finished [<end>] is still there, second.
    out = decoding.beam_search(model, features, 2, 6, 1.0)
    np.testing.assert_array_equal(out.beam_tokens[:, 0], [[4, 5, 6, 5, 6, 5]] * 2)
    np.testing.assert_array_equal(out.beam_tokens[:, 1], [[END, 0, 0, 0, 0, 0]] * 2)


def test_beam_stops_once_no_live_beam_can_win():
    # [<end>] at p .6 is finished at step 1; [4 <end>] (.4 * .9) at step 2 fills the set of 2,
    # and the best live beam (.4 * .1 = .04) can no longer beat it: done after 2 steps of 30.
    model = MarkovModel({START: {END: 0.6, 4: 0.4}, 4: {END: 0.9, 5: 0.1}, 5: {5: 1.0}})
    model.steps.assign(0)
    out = tf.function(lambda f: decoding.beam_search(model, f, 2, 30, 0.0))(random_features(1))
    assert int(model.steps.numpy()) == 2
    np.testing.assert_array_equal(out.beam_tokens[0], [[END, 0], [4, END]])
    np.testing.assert_allclose(out.beam_scores[0], np.log([0.6, 0.36]), atol=1e-5)


def test_beam_bound_uses_the_length_that_favours_live_beams():
    # alpha = 2, max_length 8. After step 2 the finished set is full: [<end>] (.6, score
    # -.51) and [4 <end>] (.255, log .255 / lp(2) = -1.00). The live <4 5> has log p -3.10;
    # with prob 1 it grows to max_length unchanged, where -3.10 / lp(8) = -.66 beats -1.00.
    # Judged at the next length only (-3.10 / lp(3) = -1.74) the search would stop too soon.
    model = MarkovModel({START: {END: 0.6, 4: 0.3, 7: 0.1}, 4: {END: 0.85, 5: 0.15},
                         5: {6: 1.0}, 6: {6: 1.0}})
    out = decoding.beam_search(model, random_features(1), 2, 8, 2.0)
    np.testing.assert_array_equal(out.beam_tokens[0], [[END] + [0] * 7, [4, 5] + [6] * 6])
    np.testing.assert_allclose(out.beam_normalized_scores[0],
                               [np.log(0.6), np.log(0.045) / (13 / 6) ** 2], atol=1e-5)


# ---------------------------------------------------------------------------------- sampling
def test_sampling_repeats_with_seed_and_approaches_greedy(random_model, copy_model):
    features = random_features(8, seed=4)
    run = tf.function(lambda f, seed, temp: decoding.sample(random_model, f, 8, temp, seed))
    a = run(features, tf.constant(11), tf.constant(1.0))
    b = run(features, tf.constant(11), tf.constant(1.0))
    c = run(features, tf.constant(12), tf.constant(1.0))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens.numpy(), c.tokens.numpy())
    check_well_formed(a, 8)
    recomputed = teacher_forced_scores(random_model, features, a.tokens.numpy(), a.lengths)
    np.testing.assert_allclose(a.scores, recomputed, atol=1e-4)
    greedy = decoding.greedy(random_model, features, 8)
    for temp in (1e-6, 0.0):
        cold = run(features, tf.constant(11), tf.constant(temp))
        np.testing.assert_array_equal(cold.tokens, greedy.tokens)
        np.testing.assert_allclose(cold.scores, greedy.scores, atol=1e-5)
    # A trained model at temperature 1 mostly says what greedy says.
    features = tf.constant(copy_task(64, np.random.default_rng(8))[0])
    warm = decoding.sample(copy_model, features, 10, 1.0, seed=3).tokens.numpy()
    greedy = decoding.greedy(copy_model, features, 10).tokens.numpy()
    assert warm.shape == greedy.shape and np.mean(np.all(warm == greedy, 1)) > 0.7


def test_never_emits_pad_or_start():
    # A model that prefers <pad> and <start>: they are skipped, yet still in the softmax.
    model = MarkovModel({START: {PAD: 0.5, START: 0.3, 4: 0.15, END: 0.05}, 4: {END: 1.0}})
    features = random_features(2)
    for out in (decoding.greedy(model, features, 5), decoding.beam_search(model, features, 2, 5),
                decoding.sample(model, features, 5, 0.5, seed=0)):
        assert not np.isin(out.beam_tokens.numpy()[..., 0], [PAD, START]).any()
        check_well_formed(out, 5)
    out = decoding.greedy(model, features, 5)
    np.testing.assert_allclose(out.scores, np.log(0.15), atol=1e-5)


# ------------------------------------------------------------------------- graph and export
def test_one_trace_serves_every_batch_size_length_and_beam_size(random_model):
    traces = []
    signature = [tf.TensorSpec([None, P, F], tf.float16), tf.TensorSpec([], tf.int32),
                 tf.TensorSpec([], tf.int32)]

    @tf.function(input_signature=signature)
    def serve(features, max_length, beam_size):
        traces.append(1)
        return decoding.decode(random_model, features, max_length, beam_size)

    @tf.function(input_signature=signature[:2] + [tf.TensorSpec([], tf.int64)])
    def draw(features, max_length, seed):
        traces.append(1)
        return decoding.sample(random_model, features, max_length, 0.8, seed)

    for batch, max_length, k in [(2, 5, 1), (3, 9, 3), (1, 4, 2), (4, 6, 1), (2, 3, 5)]:
        features = random_features(batch, seed=batch)
        out = serve(features, max_length, k)
        expected = (decoding.greedy(random_model, features, max_length) if k == 1 else
                    decoding.beam_search(random_model, features, k, max_length))
        for name in ("tokens", "scores", "lengths", "beam_tokens", "beam_normalized_scores"):
            np.testing.assert_allclose(getattr(out, name), getattr(expected, name), atol=1e-5,
                                       err_msg=name)
        assert out.beam_tokens.shape[:2] == (batch, k)
        assert out.tokens.shape[1] <= max_length
        assert draw(features, max_length, tf.constant(batch, tf.int64)).tokens.shape[0] == batch
    assert len(traces) == 2


def test_decoding_exports_in_a_saved_model(random_model, tmp_path):
    # What the export does: a signature with beam_size and max_length as inputs.
    module = tf.Module()
    module.model = random_model

    @tf.function(input_signature=[tf.TensorSpec([None, P, F], tf.float16),
                                  tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def captions(features, beam_size, max_length):
        return decoding.decode(random_model, features, max_length, beam_size)._asdict()

    module.captions = captions
    tf.saved_model.save(module, str(tmp_path), signatures={"captions": captions})
    loaded = tf.saved_model.load(str(tmp_path)).signatures["captions"]
    features = random_features(3, seed=9)
    for k in (1, 3):
        out = loaded(features=features, beam_size=tf.constant(k), max_length=tf.constant(7))
        expected = decoding.decode(random_model, features, 7, k)
        for name in ("tokens", "scores", "attention", "beam_tokens", "beam_scores"):
            np.testing.assert_allclose(out[name], getattr(expected, name), atol=1e-5,
                                       err_msg=name)


def test_decode_rejects_bad_beam_size(random_model):
    with pytest.raises(ValueError, match="beam_size"):
        decoding.decode(random_model, random_features(1), 5, beam_size=0)


# ------------------------------------------------------------------------- decoding controls
def grey_image(batch):
    """A plain grey image's features: out of distribution, and random_model loops on it
    (7 7 7 7 11 11 11 ...), as main's models loop on grey images."""
    return tf.fill([batch, P, F], tf.constant(0.5, tf.float16))


# A chain whose most likely path loops 4 5 4 5 ... and ends only by chance.
LOOP = {START: {4: 0.7, 5: 0.2, END: 0.1}, 4: {5: 0.7, 6: 0.2, END: 0.1},
        5: {4: 0.7, 6: 0.2, END: 0.1}, 6: {4: 0.5, 5: 0.4, END: 0.1}}


def hypotheses(out):
    """(tokens row, length) of every hypothesis a Decoded returns: beams and n-best."""
    for tokens, lengths in ((out.beam_tokens, out.beam_lengths),
                            (out.nbest_tokens, out.nbest_lengths)):
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        for b in range(tokens.shape[0]):
            for j in range(tokens.shape[1]):
                yield list(tokens[b, j]), int(lengths[b, j])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_holds_on_looping_inputs(random_model, n):
    features = grey_image(2)
    plain = decoding.greedy(random_model, features, 16)
    assert repeated_ngrams(list(plain.tokens.numpy()[0]), 16, 3)          # it loops
    run = tf.function(lambda f, n: (
        decoding.greedy(random_model, f, 16, no_repeat_ngram=n),
        decoding.decode(random_model, f, 16, 3, num_captions=3, no_repeat_ngram=n),
        decoding.sample(random_model, f, 16, 1.0, seed=5, no_repeat_ngram=n)))
    greedy, beam, drawn = run(features, tf.constant(n))
    for out in (greedy, beam, drawn):
        check_well_formed(out, 16)
        for row, length in hypotheses(out):
            assert not repeated_ngrams(row, length, n), (row, length)
    # Exactly the hand-made greedy with the same ban (not merely some caption without repeats).
    tokens, scores = hand_greedy(random_model, features, 16, no_repeat_ngram=n)
    np.testing.assert_array_equal(greedy.tokens, tokens[:, :greedy.tokens.shape[1]])
    np.testing.assert_allclose(greedy.scores, scores, atol=1e-4)
    # Scores stay the model's log-probabilities; beam k = 1 is still greedy.
    flat = beam.beam_tokens.numpy().reshape(6, -1)
    recomputed = teacher_forced_scores(random_model, tf.repeat(features, 3, 0), flat,
                                       beam.beam_lengths.numpy().reshape(-1))
    np.testing.assert_allclose(beam.beam_scores.numpy().reshape(-1), recomputed, atol=1e-4)
    one = decoding.beam_search(random_model, features, 1, 16, no_repeat_ngram=n)
    np.testing.assert_array_equal(one.tokens, greedy.tokens)


def test_no_repeat_ngram_on_a_looping_chain():
    model = MarkovModel(LOOP)
    features = random_features(1)
    assert decoding.greedy(model, features, 8).tokens.numpy().tolist() == [[4, 5] * 4]
    # Bigrams: 4 5 4, then 4 5 again is banned: 6; 6 -> 4, and from 4 both 5 and 6 are used.
    out = decoding.greedy(model, features, 8, no_repeat_ngram=2)
    assert out.tokens.numpy().tolist() == [[4, 5, 4, 6, 4, END]]
    np.testing.assert_allclose(out.scores, np.log(0.7 * 0.7 * 0.7 * 0.2 * 0.5 * 0.1), atol=1e-5)
    for n in (2, 3):
        beam = decoding.beam_search(model, features, 4, 12, num_captions=4, no_repeat_ngram=n)
        for row, length in hypotheses(beam):
            assert not repeated_ngrams(row, length, n)


def test_bans_that_leave_nothing_end_the_caption(random_model):
    # no_repeat_ngram 1 uses each of the 17 word ids (1, 4..19) once; min_length 25 bans <end>
    # too, and then <end> comes back: 17 distinct words and <end>, no <pad> emitted.
    for out in (decoding.greedy(random_model, grey_image(2), 25, no_repeat_ngram=1, min_length=25),
                decoding.beam_search(random_model, grey_image(2), 2, 25, no_repeat_ngram=1,
                                     min_length=25)):
        check_well_formed(out, 25)
        for row, length in hypotheses(out):
            assert length == 18 and row[17] == END and sorted(row[:17]) == [1] + list(range(4, 20))


def test_min_length_bans_end_before_m_words(random_model):
    model = MarkovModel({START: {END: 0.9, 4: 0.1}, 4: {END: 0.9, 5: 0.1}, 5: {END: 0.9, 4: 0.1}})
    features = random_features(2)
    assert decoding.greedy(model, features, 9).tokens.numpy().tolist() == [[END]] * 2
    run = tf.function(lambda m: (
        decoding.decode(model, features, 9, 1, min_length=m),
        decoding.decode(model, features, 9, 3, num_captions=3, min_length=m),
        decoding.sample(model, features, 9, 1.0, seed=3, min_length=m)))
    greedy, beam, drawn = run(tf.constant(3))
    np.testing.assert_array_equal(greedy.tokens, [[4, 5, 4, END]] * 2)
    np.testing.assert_allclose(greedy.scores, np.log(0.1 ** 3 * 0.9), atol=1e-5)
    np.testing.assert_array_equal(beam.nbest_tokens[:, 0, :4], [[4, 5, 4, END]] * 2)
    for out in (greedy, beam, drawn):
        check_well_formed(out, 9)
        assert all(length >= 4 for _, length in hypotheses(out))
    # Cut at max_length when min_length does not fit: no <end> at all.
    cut = decoding.greedy(model, features, 4, min_length=10)
    np.testing.assert_array_equal(cut.tokens, [[4, 5, 4, 5]] * 2)
    # On a real model, the hand-made reference.
    features = random_features(4, seed=6)
    tokens, _ = hand_greedy(random_model, features, 10, min_length=6)
    out = decoding.greedy(random_model, features, 10, min_length=6)
    np.testing.assert_array_equal(out.tokens, tokens[:, :out.tokens.shape[1]])
    assert np.all(out.lengths.numpy() >= 7)


@pytest.mark.parametrize("k, count, n", [(5, 3, 0), (4, 4, 2)])
def test_nbest_is_sorted_distinct_and_the_beams_best(random_model, k, count, n):
    features = random_features(4, seed=3)
    run = tf.function(lambda f, k, count, n: decoding.decode(
        random_model, f, 9, k, num_captions=count, no_repeat_ngram=n))
    out = run(features, tf.constant(k), tf.constant(count), tf.constant(n))
    tokens, lengths = out.nbest_tokens.numpy(), out.nbest_lengths.numpy()
    norm, scores = out.nbest_normalized_scores.numpy(), out.nbest_scores.numpy()
    assert tokens.shape[:2] == (4, count) and tokens.shape[1:] == out.nbest_attention.shape[1:3]
    assert tokens.shape[2] == lengths.max()                          # trimmed to the K kept
    assert np.all(np.isfinite(norm)) and np.all(np.diff(norm, axis=1) <= 0)   # best first
    for b in range(4):
        assert len({tuple(row) for row in tokens[b]}) == count       # distinct
    # The first K of the beam (same ranking), the best one is `tokens`.
    T = tokens.shape[2]
    np.testing.assert_array_equal(tokens, out.beam_tokens.numpy()[:, :count, :T])
    np.testing.assert_array_equal(norm, out.beam_normalized_scores.numpy()[:, :count])
    np.testing.assert_array_equal(tokens[:, 0], out.tokens.numpy()[:, :T])
    np.testing.assert_array_equal(out.nbest_attention.numpy()[:, 0], out.attention.numpy()[:, :T])
    np.testing.assert_allclose(norm, scores / ((5 + lengths) / 6) ** decoding.DEFAULT_ALPHA,
                               rtol=1e-5)
    recomputed = teacher_forced_scores(random_model, tf.repeat(features, count, 0),
                                       tokens.reshape(4 * count, -1), lengths.reshape(-1))
    np.testing.assert_allclose(scores.reshape(-1), recomputed, atol=1e-4)
    for row, length in hypotheses(out):
        assert not n or not repeated_ngrams(row, length, n)


def test_nbest_marks_places_no_hypothesis_filled():
    # Only one caption is possible, [4 <end>]: the other two places are blank and marked.
    model = MarkovModel({START: {4: 1.0}, 4: {END: 1.0}}, floor=0.0)
    out = decoding.decode(model, random_features(2), 6, beam_size=3, num_captions=3)
    np.testing.assert_array_equal(out.nbest_tokens, [[[4, END], [0, 0], [0, 0]]] * 2)
    np.testing.assert_array_equal(out.nbest_lengths, [[2, 0, 0]] * 2)
    for scores in (out.nbest_scores, out.nbest_normalized_scores):
        np.testing.assert_array_equal(scores, [[0.0, -np.inf, -np.inf]] * 2)
    attention = out.nbest_attention.numpy()
    np.testing.assert_allclose(attention[:, 0].sum(-1), 1.0, atol=1e-6)
    assert np.all(attention[:, 1:] == 0)


def test_alpha_changes_the_ranking():
    # test_finished_hypothesis_kept_aside_while_live_beams_go_on's chain: by raw log-probability
    # [<end>] (.35) comes first; with alpha 1 the chain cut at 6 tokens (log .18 / (11/6)) does.
    chain = {START: {4: 0.55, END: 0.35, 7: 0.1}, 4: {5: 0.8, 7: 0.2}, 5: {6: 0.8, 7: 0.2},
             6: {5: 0.8, 7: 0.2}, 7: {8: 1.0}, 8: {7: 1.0}}
    model = MarkovModel(chain)
    run = tf.function(lambda alpha: decoding.decode(model, random_features(1), 6, 2,
                                                    length_penalty_alpha=alpha, num_captions=2))
    short, long = [END, 0, 0, 0, 0, 0], [4, 5, 6, 5, 6, 5]
    for alpha, order in [(0.0, [short, long]), (1.0, [long, short])]:
        out = run(tf.constant(alpha))
        np.testing.assert_array_equal(out.nbest_tokens[0], order)
        lengths = out.nbest_lengths.numpy()
        np.testing.assert_allclose(out.nbest_normalized_scores,
                                   out.nbest_scores / ((5 + lengths) / 6) ** alpha, rtol=1e-6)


def test_defaults_reproduce_the_decoding_without_controls(random_model):
    # The controls passed as tensors at their defaults run the tf.cond path; the outputs are
    # those of the calls without them, bit for bit (and those are pinned by the tests above).
    signature = [tf.TensorSpec([None, P, F], tf.float16), tf.TensorSpec([], tf.int32),
                 tf.TensorSpec([], tf.int32)]
    zero = tf.constant(0)

    @tf.function(input_signature=signature)
    def both(features, max_length, beam_size):
        plain = [decoding.decode(random_model, features, max_length, beam_size),
                 decoding.greedy(random_model, features, max_length),
                 decoding.beam_search(random_model, features, 3, max_length),
                 decoding.sample(random_model, features, max_length, 0.8, seed=4)]
        controlled = [
            decoding.decode(random_model, features, max_length, beam_size,
                            tf.constant(decoding.DEFAULT_ALPHA), num_captions=tf.constant(1),
                            no_repeat_ngram=zero, min_length=zero),
            decoding.greedy(random_model, features, max_length, no_repeat_ngram=zero,
                            min_length=zero),
            decoding.beam_search(random_model, features, 3, max_length, num_captions=tf.constant(1),
                                 no_repeat_ngram=zero, min_length=zero),
            decoding.sample(random_model, features, max_length, 0.8, seed=4, no_repeat_ngram=zero,
                            min_length=zero)]
        return plain, controlled

    for k in (1, 3):
        plain, controlled = both(random_features(3, seed=8), 8, k)
        for a, b in zip(plain, controlled):
            for name in decoding.Decoded._fields:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
            np.testing.assert_array_equal(a.nbest_tokens[:, 0], a.tokens[:, :a.nbest_tokens.shape[2]])


def test_controls_as_signature_inputs_trace_once_and_save(random_model, tmp_path):
    traces = []
    module = tf.Module()
    module.model = random_model

    @tf.function(input_signature=[tf.TensorSpec([None, P, F], tf.float16)] +
                 [tf.TensorSpec([], tf.int32)] * 5 + [tf.TensorSpec([], tf.float32)])
    def captions(features, beam_size, max_length, num_captions, no_repeat_ngram, min_length,
                 alpha):
        traces.append(1)
        return decoding.decode(random_model, features, max_length, beam_size, alpha,
                               num_captions=num_captions, no_repeat_ngram=no_repeat_ngram,
                               min_length=min_length)._asdict()

    module.captions = captions
    settings = [(1, 7, 1, 0, 0, 0.7), (3, 9, 2, 2, 4, 0.0), (4, 6, 4, 1, 0, 1.5)]
    for batch, (k, length, count, n, m, alpha) in zip((2, 3, 1), settings):
        captions(random_features(batch), k, length, count, n, m, alpha)
    assert len(traces) == 1
    tf.saved_model.save(module, str(tmp_path), signatures={"captions": captions})
    loaded = tf.saved_model.load(str(tmp_path)).signatures["captions"]
    features = random_features(3, seed=9)
    for k, length, count, n, m, alpha in settings:
        out = loaded(features=features, beam_size=tf.constant(k), max_length=tf.constant(length),
                     num_captions=tf.constant(count), no_repeat_ngram=tf.constant(n),
                     min_length=tf.constant(m), alpha=tf.constant(alpha))
        expected = decoding.decode(random_model, features, length, k, alpha, num_captions=count,
                                   no_repeat_ngram=n, min_length=m)
        assert out["nbest_tokens"].shape[:2] == (3, count)
        for name in ("tokens", "scores", "nbest_tokens", "nbest_scores", "nbest_lengths",
                     "nbest_attention"):
            np.testing.assert_allclose(out[name], getattr(expected, name), atol=1e-5, err_msg=name)


def test_bad_controls_are_rejected(random_model):
    features = random_features(1)
    for kw, match in [(dict(beam_size=3, num_captions=4), "num_captions"),
                      (dict(beam_size=2, num_captions=0), "num_captions"),
                      (dict(no_repeat_ngram=-1), "no_repeat_ngram"),
                      (dict(min_length=-2), "min_length")]:
        with pytest.raises(ValueError, match=match):
            decoding.decode(random_model, features, 5, **kw)
    with pytest.raises(ValueError, match="min_length"):
        decoding.sample(random_model, features, 5, min_length=-1)
    run = tf.function(lambda k, count: decoding.decode(random_model, features, 5, k,
                                                       num_captions=count))
    for k, count in [(3, 4), (1, 2)]:                 # (1, 2): checked though greedy runs
        with pytest.raises(tf.errors.InvalidArgumentError, match="num_captions"):
            run(tf.constant(k), tf.constant(count))
