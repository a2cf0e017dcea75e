"""The train step's compute precision: --precision auto|float32|bfloat16.

bfloat16 is Keras' mixed_bfloat16 policy on the decoder (model/captioner.py): variables, the
softmax and the loss in float32, the rest in bfloat16 (the vocabulary projection and the fused CPU
attention kernels included). It pays where the machine multiplies bfloat16 matrices fast (CPUs with
AMX or AVX512-BF16, GPUs with bfloat16 tensor cores); elsewhere TensorFlow emulates it and the
step is slower.

auto is decided by measurement, the cheap one first:
  1. The encoder's probe (model.precision.choose): a matrix product and a convolution timed in
     bfloat16 against float32, about 0.5 s, once a process. Under its PROBE_MARGIN (1.25x: bfloat16
     is emulated here) the step cannot gain, its matmuls being most of its arithmetic: float32,
     and nothing more is timed.
  2. Else the job's own train step, on its first batch, in both precisions (built, warmed up,
     then timed in turns, median of ROUNDS): bfloat16 where it is at least STEP_MARGIN times as
     fast. This costs two traces and a few steps, once a job.
A resumed job keeps the precision it started with (config.json). Else $CAPTIONER_TRAIN_PRECISION
decides for auto where it is set (a machine, or a test suite, pinned to one precision). A job of
several workers does not measure (each would decide alone), and stays float32 unless told.
metrics.json records the choice, why, and the step's measured speedup.
"""
from __future__ import annotations

import logging
import os

from model import precision as encoder_precision
from model.precision import BFLOAT16, CHOICES, FLOAT32, Choice  # noqa: F401 - CHOICES: the flag's

AUTO = encoder_precision.AUTO
FLAG = "--precision"
ENV = "CAPTIONER_TRAIN_PRECISION"
STEP_MARGIN = 1.1  # the bfloat16 step must run at least this many times as fast as float32's
ROUNDS = 3
log = logging.getLogger(__name__)


def choose(value: str, *, resumed: str | None = None, workers: int = 1, probe=None, step_speedup=None) -> Choice:
    """The train step's precision. resumed: the compute dtype of the job being resumed (None: a new
    job); probe: the matmul measurement (default model.precision.measure); step_speedup: a function
    timing the job's step in both precisions -> bfloat16's speed over float32's (needed only where
    the probe passes)."""
    encoder_precision.check(value, FLAG)
    if value != AUTO:
        return Choice(value, value, "asked for")
    if resumed is not None:
        return Choice(value, resumed, "auto: kept from the job's first run (config.json)")
    pinned = os.environ.get(ENV)
    if pinned and encoder_precision.check(pinned, f"${ENV} (what {FLAG} auto stands for)") != AUTO:
        return Choice(value, pinned, f"auto: ${ENV}")
    if workers > 1:
        return Choice(value, FLOAT32, f"auto, unmeasured: {workers} workers would each decide alone; name "
                                      f"{FLAG} bfloat16 for workers with bfloat16 matrix units")
    # The encoder's two-stage decision, the job's own step as the work timed after the probe.
    return encoder_precision.choose(AUTO, probe, work_speedup=step_speedup, margin=STEP_MARGIN,
                                    work="this job's step")


def time_steps(make_steps, batch, rounds: int = ROUNDS) -> dict[str, float]:
    """Seconds of one train step in each precision (median of `rounds`). make_steps(compute_dtype) ->
    trainer.steps.CaptionSteps of the job's model; batch: (features, tokens) of one replica. Both
    are built and run once first (trace, kernels, optimizer slots), then timed in turns."""
    import tensorflow as tf

    features, tokens = batch
    spec = (tf.TensorSpec([None, *features.shape[1:]], features.dtype), tf.TensorSpec([None, None], tokens.dtype))
    steps = {}
    for dtype in (FLOAT32, BFLOAT16):
        steps[dtype] = make_steps(dtype)
        steps[dtype].build(spec)
        float(steps[dtype].train_step(batch)["loss"])
    # The loss is the step's last op: read, the step has run.
    seconds = encoder_precision.in_turns(
        {dtype: (lambda s=s: float(s.train_step(batch)["loss"])) for dtype, s in steps.items()}, rounds)
    log.info("train step timed in each precision: %s", ", ".join(f"{d} {t * 1e3:.0f} ms" for d, t in seconds.items()))
    return seconds
