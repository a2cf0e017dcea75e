"""The fused CPU attention kernels (model/fused_attention.py) against TensorFlow's ops and
autodiff, and their fallback where they cannot be built."""
import logging
import os
import platform

import numpy as np
import pytest
import tensorflow as tf

from model import caption_loss, fused_attention
from model.attention import attend
from tests.test_model import PAD, make_model, random_inputs, step_by_step


def _inputs(seed, batch=5, n=3, positions=7, embed=6, units=24):
    rng = np.random.default_rng(seed)
    x = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))
    return x(batch, positions, embed), x(batch, positions, units), x(n, units), x(units)


def test_attend_equals_tensorflow_ops_on_the_first_rows(fused_kernels):
    features, keys, query, v = _inputs(0)                      # n = 3 queries, B = 5 images
    got = fused_attention.attend(features, keys, query, v)
    want = attend(features[:3], keys[:3], query, v)
    for name, a, b in zip(("context", "weights", "hidden"), got, want):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_gradient_equals_autodiff_and_adds_into_the_first_rows_only(fused_kernels):
    features, keys, query, v = _inputs(1)
    rng = np.random.default_rng(2)
    d_context = tf.constant(rng.standard_normal((3, 6)).astype(np.float32))
    d_weights = tf.constant(rng.standard_normal((3, 7)).astype(np.float32))
    before = rng.standard_normal(keys.shape).astype(np.float32)            # an accumulator
    with tf.GradientTape() as tape:
        tape.watch([keys, query, v])
        context, weights, hidden = attend(features[:3], keys[:3], query, v)
        objective = tf.reduce_sum(context * d_context) + tf.reduce_sum(weights * d_weights)
    want_keys, want_query, want_v = tape.gradient(objective, [keys, query, v])

    d_query, d_v, d_keys = fused_attention.attend_grad(features, hidden, weights, d_context,
                                                       d_weights, v, tf.constant(before))
    np.testing.assert_allclose(d_query, want_query, atol=1e-5)
    np.testing.assert_allclose(d_v, want_v, atol=1e-5)
    np.testing.assert_allclose(d_keys, before + want_keys.numpy(), atol=1e-5)
    np.testing.assert_array_equal(d_keys[3:], before[3:])


def test_bad_shapes_are_refused_with_the_shapes(fused_kernels):
    features, keys, _, v = _inputs(3, batch=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"shapes do not agree.*\[3,24\]"):
        fused_attention.attend(features, keys, tf.zeros([3, 24]), v)      # 3 queries, 2 images
    with pytest.raises(tf.errors.InvalidArgumentError, match="shapes do not agree"):
        fused_attention.attend_grad(features, tf.zeros([2, 7, 24]), tf.zeros([2, 7]),
                                    tf.zeros([2, 6]), tf.zeros([2, 7]), v, tf.zeros([1, 7, 24]))


@pytest.mark.parametrize("gate", [False, True])
def test_training_loss_and_gradients_with_the_kernels_equal_autodiff(fused_kernels, gate):
    # The packed training loop with the kernels against plain autodiff of step(): same loss
    # (with the attention regulariser), same gradient for every variable.
    model = make_model(gate=gate)
    features, tokens = random_inputs(batch=5, length=8)
    tokens = tokens.numpy()
    tokens[1, 4:] = PAD
    tokens = tf.constant(tokens)

    @tf.function
    def fused():
        with tf.GradientTape() as tape:
            loss = model.teacher_forced_loss(features, tokens, attention_reg=0.7,
                                             fused_attention=True).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    with tf.GradientTape() as tape:
        logits, attention = step_by_step(model, features, tokens)
        slow = caption_loss(logits, tokens[:, 1:], attention, 0.7).loss
    slow_grads = tape.gradient(slow, model.trainable_variables)
    loss, grads = fused()
    np.testing.assert_allclose(loss, slow, rtol=1e-5)
    for var, a, b in zip(model.trainable_variables, grads, slow_grads):
        a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
        scale = float(tf.reduce_max(tf.abs(b))) + 1e-6
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=var.path)


# bfloat16 has 8 significant bits: one rounding is off by at most 2^-8 of the value, and a
# tanh or exp computed by another vectorised path may land one step the other side: 2^-7.
BF16_ROUNDING = 2.0 ** -7


def _bf16(*tensors):
    """The tensors rounded to bfloat16, and the same values widened back to float32."""
    rounded = [tf.cast(t, tf.bfloat16) for t in tensors]
    return rounded, [tf.cast(t, tf.float32) for t in rounded]


def test_bfloat16_attend_is_float32_arithmetic_rounded_once(fused_kernels):
    # The float32 reference on the same (bfloat16-valued) inputs: the kernel widens, computes
    # in float32, and rounds each output once; the softmax weights stay float32.
    (features, keys, query, v), wide = _bf16(*_inputs(4, units=64))
    context, weights, hidden = fused_attention.attend(features, keys, query, v)
    assert (context.dtype, weights.dtype, hidden.dtype) == (tf.bfloat16, tf.float32, tf.bfloat16)
    want = attend(wide[0][:3], wide[1][:3], wide[2], wide[3])
    np.testing.assert_allclose(weights, want[1], rtol=1e-5, atol=1e-7)
    for name, got, ref in (("context", context, want[0]), ("hidden", hidden, want[2])):
        np.testing.assert_allclose(tf.cast(got, tf.float32), ref, rtol=BF16_ROUNDING, atol=1e-6, err_msg=name)


def test_bfloat16_gradient_accumulates_in_float32(fused_kernels):
    # d_keys is a float32 accumulator: shares added to a sum of 16 are kept to float32's 2e-6, where
    # a bfloat16 accumulator (8 bits) would round each to a multiple of 0.125.
    (features, keys, query, v), wide = _bf16(*_inputs(5, units=64))
    _, weights, hidden = fused_attention.attend(features, keys, query, v)
    rng = np.random.default_rng(6)
    d_context, wide_d_context = _bf16(tf.constant(rng.standard_normal((3, 6)).astype(np.float32)))
    d_weights = tf.constant(rng.standard_normal((3, 7)).astype(np.float32))
    before = np.full(keys.shape, 16.0, np.float32)
    d_query, d_v, d_keys = fused_attention.attend_grad(features, hidden, weights, d_context[0], d_weights, v,
                                                       tf.constant(before))
    assert (d_query.dtype, d_v.dtype, d_keys.dtype) == (tf.bfloat16, tf.float32, tf.float32)
    # The gradient's arithmetic in float64 on the kernel's own inputs (the float32 tests above check
    # that arithmetic against autodiff): what the bfloat16 kernel computes before its one rounding.
    f, h, dc, vv = (np.float64(tf.cast(t, tf.float32)) for t in (wide[0][:3], hidden, wide_d_context[0], wide[3]))
    a, g = np.float64(weights), np.einsum("bpe,be->bp", f, dc) + np.float64(d_weights)
    d_score = a * (g - (a * g).sum(-1, keepdims=True))
    want_in = d_score[..., None] * vv * (1 - h * h)
    want_v = (d_score[..., None] * h).sum((0, 1))
    shares = d_keys[:3] - before[:3]
    np.testing.assert_allclose(shares, want_in, rtol=1e-4, atol=4e-6)
    np.testing.assert_array_equal(d_keys[3:], before[3:])
    np.testing.assert_allclose(d_v, want_v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tf.cast(d_query, tf.float32), want_in.sum(1), rtol=BF16_ROUNDING, atol=1e-6)


def test_bfloat16_training_gradients_with_the_kernels_match_float32(fused_kernels):
    # The packed bfloat16 loop with the kernels against float32 autodiff of the same weights:
    # every gradient within bfloat16's few digits, and not clearly further off than the ops' bfloat16 loop.
    features, tokens = random_inputs(batch=5, length=8)
    reference = make_model(gate=True)
    model = make_model(gate=True, compute_dtype="bfloat16")

    def loss_and_grads(m, fused):
        with tf.GradientTape() as tape:
            loss = m.teacher_forced_loss(features, tokens, attention_reg=0.7, fused_attention=fused).loss
        return float(loss), tape.gradient(loss, m.trainable_variables)

    want_loss, want = loss_and_grads(reference, False)

    def errors(fused):
        loss, grads = loss_and_grads(model, fused)
        assert abs(loss - want_loss) < 0.02 * abs(want_loss), (fused, loss, want_loss)
        return [float(tf.norm(tf.convert_to_tensor(a) - b) / (tf.norm(b) + 1e-9)) for a, b in zip(grads, want)]

    fused_errors, ops_errors = errors(True), errors(False)
    # 0.025 and 0.023 here (AMD EPYC): the matmuls' bfloat16 rounding, which both loops share
    assert max(fused_errors) < 0.05, fused_errors
    assert max(fused_errors) < 1.5 * max(ops_errors), (fused_errors, ops_errors)


def _kernels_apply_here():
    """Skip unless the fused kernels apply on this machine (CPU training in float32)."""
    reason = fused_attention.unsupported_reason("float32")
    if reason is not None:
        pytest.skip(f"the fused attention kernels do not apply here: {reason}")


def test_resolve_choices_that_hold_on_any_machine():
    # Neither the device nor the compiler matters for these.
    assert fused_attention.resolve("ops", "float32") is False
    assert fused_attention.resolve("ops", "bfloat16") is False
    assert fused_attention.resolve("auto", "float16") is False
    with pytest.raises(fused_attention.KernelError, match="take float32 or bfloat16 tensors and the job "
                                                          "computes in float16"):
        fused_attention.resolve("fused", "float16")
    with pytest.raises(fused_attention.KernelError, match="one of auto, fused, ops"):
        fused_attention.resolve("fast", "float32")


def test_resolve_choices_where_the_kernels_apply(fused_kernels):
    _kernels_apply_here()                                             # CPU, built
    for dtype in fused_attention.DTYPES:
        assert fused_attention.resolve("auto", dtype) is True
        assert fused_attention.resolve("fused", dtype) is True


def test_resolve_choices_on_a_gpu_machine(monkeypatch, caplog):
    # A machine with a GPU trains there: auto takes the ops and says why, fused is refused.
    # Shown here with the device list of such a machine (the real one, where there is a GPU).
    real = tf.config.list_physical_devices
    if not real("GPU"):
        monkeypatch.setattr(tf.config, "list_physical_devices",
                            lambda kind=None: [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
                            if kind == "GPU" else real(kind))
    assert fused_attention.resolve("auto", "float32") is False
    assert "attention: TensorFlow ops (they are CPU kernels and this machine trains on its GPUs)" in caplog.text
    with pytest.raises(fused_attention.KernelError, match="fused: not available: they are CPU kernels"):
        fused_attention.resolve("fused", "float32")


def test_without_a_compiler_auto_falls_back_and_fused_says_why(tmp_path, monkeypatch, caplog):
    _kernels_apply_here()       # elsewhere (a GPU) resolve never gets as far as the compiler
    monkeypatch.setenv("SAT_KERNEL_CACHE", str(tmp_path))       # nothing built here yet
    monkeypatch.setenv("CXX", "/bin/false")                      # a compiler that fails
    monkeypatch.setattr(fused_attention, "_module", None)
    monkeypatch.setattr(fused_attention, "_error", None)
    caplog.set_level(logging.DEBUG, logger=fused_attention.__name__)
    assert fused_attention.resolve("auto", "float32") is False
    # One short line at the default level; the compiler's own words only under --verbose (DEBUG).
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert shown == ["attention: TensorFlow ops (the fused CPU kernels did not compile with /bin/false; "
                     "--verbose shows its messages)"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert [m.splitlines()[0] for m in debug] == [f"the {b} build of additive_attention.cc failed:"
                                                  for b in fused_attention.BUILDS]
    with pytest.raises(fused_attention.KernelError, match="--attention-kernel fused: not available"):
        fused_attention.resolve("fused", "float32")
    assert list(tmp_path.iterdir()) == []                        # no half-built file left


def test_a_failed_tuned_build_falls_back_to_the_portable_one(fused_kernels, tmp_path, monkeypatch, caplog):
    # Forced: a compiler that refuses every tuned (-march) build and "compiles" the portable one
    # into a placeholder. Nothing is loaded from it: a second library registering the same ops
    # would clash with the kernels this session loaded.
    tried = []

    def compile_library(cxx, target, output):
        tried.append(target)
        if any(flag.startswith("-march=") for flag in target):
            return "error: this CPU is not supported"
        with open(output, "wb") as f:
            f.write(b"portable build")
        return None

    monkeypatch.setenv("SAT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(fused_attention, "compile_library", compile_library)
    path = fused_attention.library_path()
    assert tried[1] == [] and tried[0][0] == "-march=native"          # tuned first, then portable
    assert fused_attention.build_of(path) == "portable" and os.listdir(tmp_path) == [os.path.basename(path)]
    tried.clear()
    assert fused_attention.library_path() == path and tried == []     # kept, not rebuilt
    # What a job trained on such a build says first.
    monkeypatch.setattr(fused_attention, "_loaded_build", fused_attention.build_of(path))
    caplog.set_level(logging.INFO, logger=fused_attention.__name__)
    assert fused_attention.resolve("auto", "float32") is True
    assert "attention: fused CPU kernels (portable build: the build for this CPU failed)" in caplog.text


def test_the_tuned_build_compiles_for_a_cpu_with_avx512_fp16(fused_kernels, tmp_path):
    # Sapphire Rapids has AVX512-FP16, with which TensorFlow's Eigen headers stop g++ 12; the
    # tuned build must compile for it from any x86-64 machine (the library is not loaded: it
    # may hold instructions this CPU lacks).
    cxx = fused_attention.compiler()
    if platform.machine() not in ("x86_64", "AMD64") or not fused_attention._accepts(cxx, "-march=sapphirerapids"):
        pytest.skip(f"{cxx} on {platform.machine()} cannot target Sapphire Rapids")
    out = str(tmp_path / "spr.so")
    target = fused_attention.target_flags(cxx, fused_attention.TUNED, march="sapphirerapids")
    messages = fused_attention.compile_library(cxx, target, out)
    assert messages is None, messages
    assert os.path.getsize(out) > 0 and os.listdir(tmp_path) == ["spr.so"]


def test_build_is_cached_per_source(fused_kernels, tmp_path, monkeypatch):
    # fused_kernels: skipped, saying why, where they cannot be built (no C++ compiler).
    monkeypatch.setenv("SAT_KERNEL_CACHE", str(tmp_path))
    first = fused_attention.library_path()                        # built into the empty cache
    assert first.endswith("-tuned.so")                            # this CPU's build compiles here
    assert os.path.dirname(first) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(first)]
    mtime = os.stat(first).st_mtime_ns
    assert fused_attention.library_path() == first                # second call: no rebuild
    assert os.stat(first).st_mtime_ns == mtime
    assert os.listdir(tmp_path) == [os.path.basename(first)]
