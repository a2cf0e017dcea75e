"""The Transformer decoder (model/transformer_decoder.py) through the one decoder interface: the
cached step against the full causal pass, every decoder on it, the training loss, learning."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from model import Captioner, CaptionerConfig, caption_loss, decoding
from model.transformer_decoder import TransformerState, sinusoid
from tests.test_decoding import check_well_formed, hand_greedy, random_features, teacher_forced_scores
from tests.test_model import (
    START,
    F,
    P,
    V,
    copy_task,
    make_model,
    random_inputs,
    small_config,
    step_by_step,
    train_on_copy_task,
)


def transformer(seed=0, **kw):
    kw.setdefault("heads", 4)
    return make_model(seed=seed, decoder="transformer", **kw)


@pytest.fixture(scope="module")
def model():
    return transformer(seed=1)


# ------------------------------------------------------------------------------ the cache
def test_cached_steps_equal_the_full_causal_pass(model):
    features, tokens = random_inputs(batch=4, length=9)
    logits, attention = model.teacher_forced(features, tokens)
    assert logits.shape == (4, 8, V) and attention.shape == (4, 8, P)
    step_logits, step_attention = step_by_step(model, features, tokens)
    np.testing.assert_allclose(step_logits, logits, atol=2e-5)
    np.testing.assert_allclose(step_attention, attention, atol=1e-6)
    np.testing.assert_allclose(tf.reduce_sum(attention, -1), 1.0, atol=1e-5)
    # A later word never reaches an earlier position: change the last input, only its row moves.
    changed = tf.concat([tokens[:, :-2], (tokens[:, -2:-1] + 1) % V, tokens[:, -1:]], 1)
    again, _ = model.teacher_forced(features, changed)
    np.testing.assert_array_equal(again[:, :-1], logits[:, :-1])
    assert not np.allclose(again[:, -1], logits[:, -1])


def test_the_cache_grows_a_word_a_step_and_the_grid_is_made_once(model):
    state = model.init_state(random_features(3))
    assert isinstance(state, TransformerState) and len(state.cache) == len(state.memory) == 2
    memory = [m.numpy() for m in tf.nest.flatten(state.memory)]
    for t in range(1, 4):
        _, state, _ = model.step(state, tf.fill([3], t + 3))
        for keys, values in state.cache:
            assert keys.shape == values.shape == (3, 4, t, 8)          # [B, heads, t, units / heads]
    for before, after in zip(memory, tf.nest.flatten(state.memory)):
        np.testing.assert_array_equal(before, after)
    # Beam search's reorder moves the words' cache and leaves each image's grid where it is.
    moved = model.reorder(state, tf.constant([2, 2, 0]))
    np.testing.assert_array_equal(moved.cache[1][0][0], state.cache[1][0][2])
    assert moved.memory is state.memory


def test_sinusoid_positions_are_distinct_and_continue_where_the_cache_ends():
    whole = sinusoid(0, 12, 10).numpy()
    np.testing.assert_allclose(sinusoid(5, 7, 10), whole[5:], atol=1e-6)
    assert whole.shape == (12, 10) and len({tuple(np.round(r, 4)) for r in whole}) == 12
    assert sinusoid(0, 3, 7).shape == (3, 7)                           # odd widths too


# ------------------------------------------------------------------------------- decoding
def test_greedy_and_its_scores_are_the_full_pass_log_probs(model):
    features = random_features(5)
    out = tf.function(lambda f: decoding.greedy(model, f, 8))(features)
    tokens, scores = hand_greedy(model, features, 8)
    np.testing.assert_array_equal(out.tokens, tokens[:, :out.tokens.shape[1]])
    np.testing.assert_allclose(out.scores, scores, atol=1e-4)
    check_well_formed(out, 8)
    recomputed = teacher_forced_scores(model, features, out.tokens.numpy(), out.lengths.numpy())
    np.testing.assert_allclose(out.scores, recomputed, atol=1e-4)


def test_beam_search_scores_and_attention_are_the_full_pass_ones(model):
    features = random_features(4, seed=2)
    k, max_length = 3, 7
    out = tf.function(lambda f: decoding.beam_search(model, f, k, max_length))(features)
    check_well_formed(out, max_length)
    assert np.all(np.diff(out.beam_normalized_scores.numpy(), axis=1) <= 0)
    tokens, lengths = out.beam_tokens.numpy().reshape(4 * k, -1), out.beam_lengths.numpy().reshape(-1)
    recomputed = teacher_forced_scores(model, tf.repeat(features, k, 0), tokens, lengths)
    np.testing.assert_allclose(out.beam_scores.numpy().reshape(-1), recomputed, atol=1e-4)
    best = out.tokens.numpy()
    _, attention = model.teacher_forced(features, tf.constant(np.concatenate(
        [np.full((4, 1), START), best], 1).astype(np.int32)))
    real = np.arange(best.shape[1])[None] < out.lengths.numpy()[:, None]
    np.testing.assert_allclose(out.attention.numpy()[real], attention.numpy()[real], atol=1e-5)
    one = decoding.beam_search(model, features, 1, max_length)
    np.testing.assert_array_equal(one.tokens, decoding.greedy(model, features, max_length).tokens)


def test_one_trace_serves_every_batch_length_and_beam_size_and_saves(model, tmp_path):
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, P, F], tf.float16), tf.TensorSpec([], tf.int32),
                                  tf.TensorSpec([], tf.int32)])
    def captions(features, max_length, beam_size):
        traces.append(1)
        return decoding.decode(model, features, max_length, beam_size, num_captions=1, no_repeat_ngram=2)._asdict()

    for batch, max_length, k in [(2, 5, 1), (3, 9, 3), (1, 4, 2)]:
        features = random_features(batch, seed=batch)
        out = captions(features, max_length, k)
        eager = decoding.decode(model, features, max_length, k, no_repeat_ngram=2)
        np.testing.assert_array_equal(out["tokens"], eager.tokens)
    assert len(traces) == 1
    module = tf.Module()
    module.model, module.captions = model, captions
    tf.saved_model.save(module, str(tmp_path), signatures={"captions": captions})
    loaded = tf.saved_model.load(str(tmp_path)).signatures["captions"]
    features = random_features(2, seed=9)
    got = loaded(features=features, max_length=tf.constant(6), beam_size=tf.constant(3))
    np.testing.assert_array_equal(got["tokens"], decoding.decode(model, features, 6, 3, no_repeat_ngram=2).tokens)


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("graph", [False, True])
def test_packed_loss_equals_the_padded_loss_and_its_gradients(model, graph):
    features, tokens = random_inputs(batch=3, length=8)
    tokens = tf.pad(tokens, [[0, 0], [0, 3]])                          # trailing pad columns too

    def both():
        with tf.GradientTape(persistent=True) as tape:
            packed = model.teacher_forced_loss(features, tokens, training=False)
            logits, attention = model.teacher_forced(features, tokens)
            padded = caption_loss(logits, tokens[:, 1:], attention, model.config.attention_reg)
        variables = model.trainable_variables
        return packed, padded, tape.gradient(packed.loss, variables), tape.gradient(padded.loss, variables)

    packed, padded, g_packed, g_padded = (tf.function(both) if graph else both)()
    np.testing.assert_allclose(packed, padded, rtol=1e-5)
    assert float(packed.reg) > 0
    for a, b, v in zip(g_packed, g_padded, model.trainable_variables):
        assert a is not None and float(tf.reduce_max(tf.abs(a))) > 0, v.path
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), atol=1e-5, err_msg=v.path)


def test_padded_path_compiles_with_xla_and_bfloat16_keeps_float32_outputs(model):
    features, tokens = random_inputs(batch=3, length=7)
    xla = tf.function(lambda f, t: model.teacher_forced(f, t), jit_compile=True)(features, tokens)
    np.testing.assert_allclose(xla[0], model.teacher_forced(features, tokens)[0], atol=1e-4)
    half = transformer(seed=1, compute_dtype="bfloat16")
    half.set_weights(model.get_weights())
    logits, attention = half.teacher_forced(features, tokens)
    assert logits.dtype == attention.dtype == tf.float32 and half.decoder.fc.compute_dtype == "bfloat16"
    assert np.max(np.abs(logits - model.teacher_forced(features, tokens)[0])) < 0.15
    check_well_formed(decoding.beam_search(half, features, 2, 5), 5)


def test_learns_the_copy_task():
    # Only cross-attention to the flagged cell can tell the symbol (chance 1/8).
    model, losses = train_on_copy_task(transformer, 300, 2e-3)
    features, caps = copy_task(128, np.random.default_rng(99))
    out = decoding.greedy(model, tf.constant(features), 6)
    exact = np.mean(np.all(out.tokens.numpy() == caps[:, 1:], axis=1))
    print(f"transformer copy task: loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-10:]):.3f}, exact {exact:.0%}")
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:5])
    assert exact >= 0.9


# --------------------------------------------------------------------------------- config
def test_config_names_the_decoder_and_checks_its_settings(tmp_path):
    config = small_config(decoder="transformer", heads=4, layers=3)
    assert config.ff_units == 2 * config.units                         # spelled out when saved
    again = CaptionerConfig.from_json(config.to_json())
    assert again == config
    keras.utils.set_random_seed(1)
    a = Captioner(config)
    path = tf.train.Checkpoint(model=a).write(str(tmp_path / "ckpt"))
    # Every weight is in a checkpoint of the model alone (what the export restores), not only
    # reachable through the optimizer's list of variables.
    assert len([n for n, _ in tf.train.list_variables(path) if n.startswith("model/")]) == len(a.weights)
    keras.utils.set_random_seed(2)
    b = Captioner(again)
    tf.train.Checkpoint(model=b).read(path).assert_consumed()
    assert len(b.decoder.blocks) == 3
    features, tokens = random_inputs()
    np.testing.assert_array_equal(b.teacher_forced(features, tokens)[0], a.teacher_forced(features, tokens)[0])
    with pytest.raises(ValueError, match="decoder must be one of"):
        small_config(decoder="lstm")
    with pytest.raises(ValueError, match="multiple of heads"):
        small_config(decoder="transformer", heads=5)
    # A config saved before decoders were a choice is the GRU's.
    old = {k: v for k, v in small_config().to_dict().items() if k not in ("decoder", "layers", "heads", "ff_units")}
    assert CaptionerConfig.from_dict(old).decoder == "gru"


def test_every_registered_family_is_a_choice():
    from model import decoders

    assert set(decoders._families()) == set(decoders.NAMES)
    for name in decoders.NAMES:
        layer = decoders.make(small_config(decoder=name, heads=4))
        for method in ("initial_state", "step", "reorder", "state_invariants", "teacher_forced",
                       "packed_teacher_forced", "logits"):
            assert callable(getattr(layer, method)), (name, method)
