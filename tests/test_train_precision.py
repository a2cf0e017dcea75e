"""The train step's precision (trainer/precision.py): what auto decides from what it measures,
and the timing it measures with. The trainer's runs in bfloat16 are in tests/test_trainer.py."""
import numpy as np
import pytest
import tensorflow as tf

from model import CaptionerConfig
from model import precision as matmul_precision
from trainer import precision
from trainer.steps import CaptionSteps


def probe(speedup):
    return lambda: matmul_precision.Probe(speedup, "CPU", 0.0)


def never():
    raise AssertionError("the step was timed where it should not have been")


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)


def test_asked_for_is_taken_as_it_is(unpinned):
    for value in ("float32", "bfloat16"):
        c = precision.choose(value, resumed="float32" if value == "bfloat16" else "bfloat16", probe=never)
        assert (c.precision, c.why) == (value, "asked for")


@pytest.mark.parametrize("speedup", [0.0, 0.55, 0.95, 1.24])
def test_auto_without_fast_bfloat16_matmuls_keeps_float32_and_times_no_step(unpinned, speedup):
    c = precision.choose("auto", probe=probe(speedup), step_speedup=never)
    assert c.precision == "float32" and c.speedup == speedup
    assert f"{speedup:.2f}x" in c.why and "not timed" in c.why


@pytest.mark.parametrize("matmuls", [1.25, 1.56, 3.9])
@pytest.mark.parametrize("step,picked", [(0.8, "float32"), (1.09, "float32"), (1.1, "bfloat16"), (1.7, "bfloat16")])
def test_auto_with_fast_matmuls_takes_the_faster_step(unpinned, matmuls, step, picked):
    c = precision.choose("auto", probe=probe(matmuls), step_speedup=lambda: step)
    assert (c.precision, c.speedup) == (picked, step)
    assert f"step measured {step:.2f}x" in c.why


def test_auto_keeps_a_resumed_jobs_precision_before_anything_else(monkeypatch):
    monkeypatch.setenv(precision.ENV, "float32")
    c = precision.choose("auto", resumed="bfloat16", workers=4, probe=never, step_speedup=never)
    assert c.precision == "bfloat16" and "first run" in c.why


def test_the_environment_pins_auto_and_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv(precision.ENV, "bfloat16")
    assert precision.choose("auto", probe=never).precision == "bfloat16"
    assert precision.choose("float32", probe=never).precision == "float32"     # the flag wins
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(matmul_precision.PrecisionError, match=r"\$CAPTIONER_TRAIN_PRECISION .*'fast': choose one"):
        precision.choose("auto", probe=never)
    with pytest.raises(matmul_precision.PrecisionError, match="--precision 'float16'"):
        precision.choose("float16")


def test_several_workers_do_not_measure(unpinned):
    c = precision.choose("auto", workers=2, probe=never, step_speedup=never)
    assert c.precision == "float32" and "--precision bfloat16" in c.why


def test_time_steps_builds_and_times_the_step_in_both_precisions():
    config = CaptionerConfig(vocab_size=30, embedding_dim=8, units=16, num_positions=16, feature_dim=12)
    made = []

    def make(dtype):
        made.append(CaptionSteps(CaptionerConfig.from_dict(dict(config.to_dict(), compute_dtype=dtype)),
                                 np.zeros(12, np.float32), np.ones(12, np.float32), tf.distribute.get_strategy(),
                                 1e-3, 5.0, attention_kernel="ops"))
        return made[-1]

    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 30, (4, 6)).astype(np.int32)
    tokens[:, 0] = 2
    batch = (tf.constant(rng.standard_normal((4, 16, 12)).astype(np.float16)), tf.constant(tokens))
    seconds = precision.time_steps(make, batch, rounds=2)
    assert set(seconds) == {"float32", "bfloat16"} and all(t > 0 for t in seconds.values())
    assert [s.model.config.compute_dtype for s in made] == ["float32", "bfloat16"]
    # each step ran its warm-up and both rounds: the optimizer took 3 steps
    assert [int(s.optimizer.iterations) for s in made] == [3, 3]
