"""The image encoder's compute precision: float32, or bfloat16 where this machine runs it clearly faster.

    choice = precision.choose("auto", work_speedup=lambda: precision.time_encoder(encoder))
    precision.set_compute(encoder, choice.precision)     # the backbone's layers compute in it
    features = precision.encode(encoder, pixels)         # float32 out, whatever it computed in

`--encoder-precision auto|float32|bfloat16` (preprocessing, the export, batch captioning) comes
here. `auto` is decided by measurement, never by the processor's name, in two stages:
  1. `measure` times a float32 and a bfloat16 matrix product and 3x3 convolution of InceptionV3's
     sizes, interleaved, on the device TensorFlow runs the encoder on (a GPU if it sees one, else
     the CPU), in under a second on a CPU, once a process. Under PROBE_MARGIN, float32, and nothing
     more is timed: CPUs where TensorFlow emulates bfloat16 (AMD Zen 2: no faster than float32,
     often slower) and GPUs without bfloat16 tensor cores stop here.
  2. Where it passes (Intel AMX; AVX512-BF16, as on AMD Zen 4; bfloat16 tensor cores), the caller's
     own encoder is timed in both (`time_encoder`, a few seconds), and bfloat16 is chosen only where
     that network runs at least MARGIN times as fast. The probe alone does not speak for every
     backbone: on a Zen 4 EPYC it measured 1.66x, InceptionV3 ran 1.71x and MobileNetV3-Large
     0.87x (its depthwise convolutions and hard-swish gain nothing from bfloat16 dot products).
float16 is never chosen.

bfloat16 is Keras' mixed_bfloat16 policy on every layer of the backbone: the weights stay float32
(saved and restored as they are), each layer computes in bfloat16, batch norms in float32.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

from caption_io import cli

AUTO, FLOAT32, BFLOAT16 = CHOICES = ("auto", "float32", "bfloat16")
FLAG = "--encoder-precision"
# The flag's default where it is not given (else auto): pins a machine or a test suite to one precision.
ENV = "CAPTIONER_ENCODER_PRECISION"
MARGIN = 1.5  # bfloat16 must run at least this many times as fast as float32 for auto to choose it
# The probe's bar for timing the real work: bfloat16 runs in hardware here. Emulated, the probe
# measures 0.92-0.95x (AMD Zen 2), 0.20-0.35x (Intel Ice Lake); with AVX512-BF16, 1.56-1.68x
# (Zen 4), with AMX more.
PROBE_MARGIN = 1.25
_POLICIES = {FLOAT32: "float32", BFLOAT16: "mixed_bfloat16"}
_ROUNDS = 5
_MIN_SECONDS = 0.01  # each timed call at least this long (GPUs repeat the work inside it)
TIMING_BATCH = 8    # pictures a call when an encoder itself is timed (InceptionV3 on 2 cores: ~0.5 s)


class PrecisionError(ValueError, cli.UserError):
    """A precision this code does not have (one readable line)."""


def check(value: str, where: str = FLAG) -> str:
    if value not in CHOICES:
        raise PrecisionError(f"{where} {value!r}: choose one of {', '.join(CHOICES)}")
    return value


def default() -> str:
    """The flag's default: $CAPTIONER_ENCODER_PRECISION where set, else auto."""
    return check(os.environ.get(ENV) or AUTO, f"{ENV} ({FLAG}'s default)")


def add_flag(parser, decided: str) -> None:
    """--encoder-precision on a command; `decided`: where that command's auto is measured."""
    parser.add_argument(FLAG, default=default(), choices=CHOICES,
                        help=f"the image encoder's compute precision: bfloat16 (Keras' mixed_bfloat16), float32, "
                             f"or auto, bfloat16 only where it measures >= {MARGIN}x float32's speed, {decided} "
                             f"(default: ${ENV}, else auto)")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What `measure` found: bfloat16's speed over float32's on `device` (0: bfloat16 does not run there)."""
    speedup: float
    device: str
    seconds: float  # what the measurement took


@dataclasses.dataclass(frozen=True)
class Choice:
    asked: str      # auto, float32 or bfloat16
    precision: str  # float32 or bfloat16
    why: str        # in words, for a log line
    speedup: float | None = None  # auto's measurement, where one was made

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return f"{self.precision} ({self.why})"


def choose(asked: str, probe=None, measurable: bool = True, work_speedup=None, margin: float = MARGIN,
           work: str = "the encoder itself") -> Choice:
    """The precision to compute in. probe: what measures this machine (default `measure`; tests
    give their own); measurable False: the work runs elsewhere (a remote runner's workers), so auto
    keeps float32, unmeasured. work_speedup: () -> the caller's own work's bfloat16 speed over
    float32's (`time_encoder`; the trainer's step), called only where the probe shows bfloat16 in
    hardware (PROBE_MARGIN), and bfloat16 is chosen where it reaches `margin`; `work` names it in
    the reason. Without it the probe decides alone, at MARGIN."""
    check(asked)
    if asked != AUTO:
        return Choice(asked, asked, "asked for")
    if not measurable:
        return Choice(asked, FLOAT32, f"auto, unmeasured: the workers are other machines; name {FLAG} bfloat16 "
                                      "for workers with bfloat16 matrix units")
    found = (probe or measure)()
    bar = MARGIN if work_speedup is None else PROBE_MARGIN
    passed = found.speedup >= bar
    why = (f"auto: bfloat16 measured {found.speedup:.2f}x float32's speed on this {found.device}, "
           f"{'at least' if passed else 'under'} {bar}x")
    if work_speedup is None or not passed:
        return Choice(asked, BFLOAT16 if passed else FLOAT32,
                      why if work_speedup is None else f"{why}; {work} was not timed", found.speedup)
    own = work_speedup()
    picked = BFLOAT16 if own >= margin else FLOAT32
    return Choice(asked, picked, f"auto: {work} measured {own:.2f}x float32's speed in bfloat16 on this "
                                 f"{found.device}, {'at least' if picked == BFLOAT16 else 'under'} {margin}x "
                                 f"(the matmul/convolution probe: {found.speedup:.2f}x)", own)


def set_compute(model, precision: str) -> None:
    """Every layer of the Keras `model` (nested ones too) computes in `precision` from its next
    trace on; its variables are untouched."""
    if precision not in _POLICIES:
        raise PrecisionError(f"an encoder computes in float32 or bfloat16, not {precision!r} (choose() decides auto)")
    for layer in _layers(model):
        layer.dtype_policy = _POLICIES[precision]


def time_encoder(model, batch: int = TIMING_BATCH, rounds: int = 3) -> float:
    """`model`'s (a backbone: [B, size, size, 3] -> features) bfloat16 speed over its float32 speed:
    a batch of seeded noise pictures at its input size, each precision traced and warmed, then
    `rounds` calls of each in turns, medians. Its layers compute as they did before, after."""
    import tensorflow as tf

    before = [(layer, layer.dtype_policy) for layer in _layers(model)]
    pixels = tf.random.stateless_uniform([batch, *model.input_shape[1:]], seed=[0, 1], minval=-1.0, maxval=1.0)
    calls = {}
    try:
        for name in (FLOAT32, BFLOAT16):  # each traced under its own policies
            set_compute(model, name)
            calls[name] = tf.function(lambda x: encode(model, x))
            calls[name](pixels).numpy()
    finally:
        for layer, policy in before:
            layer.dtype_policy = policy
    seconds = in_turns({name: (lambda call=call: call(pixels).numpy()) for name, call in calls.items()}, rounds)
    return seconds[FLOAT32] / seconds[BFLOAT16]


def in_turns(calls: dict, rounds: int) -> dict:
    """Median seconds of each of `calls` (name -> a function that runs its work to the end), called
    `rounds` times in turns, the order reversed every other round so that neither always follows
    the other (and inherits its caches or its heat). Trace and warm each up before."""
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name in list(calls)[:: -1 if r % 2 else 1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _layers(layer):
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from _layers(inner)


def encode(model, pixels):
    """The backbone's features of prepared pixels, as float32 (a float32 model's own output as it is)."""
    import tensorflow as tf

    return tf.cast(model(pixels, training=False), tf.float32)


_MEASURED: dict[str, Probe] = {}


def measure() -> Probe:
    """bfloat16's speed over float32's here, on the encoders' kind of work (once a process)."""
    import tensorflow as tf

    device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    if device not in _MEASURED:
        _MEASURED[device] = _measure(device)
    return _MEASURED[device]


def _work(dtype):
    """`repeats` times, a [1024, 768] x [768, 768] product and a 3x3 convolution of [8, 17, 17, 128]
    (InceptionV3's middle blocks' sizes at a batch of 8), each fed the last one's output -> a scalar."""
    import tensorflow as tf

    def normal(shape, seed, scale):
        return tf.cast(tf.random.stateless_normal(shape, seed=[7, seed]) * scale, dtype)

    x, w = normal([1024, 768], 0, 1.0), normal([768, 768], 1, 768 ** -0.5)
    z, k = normal([8, 17, 17, 128], 2, 1.0), normal([3, 3, 128, 128], 3, (9 * 128) ** -0.5)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def run(repeats):
        a, b = x, z
        for _ in tf.range(repeats):
            a = tf.matmul(a, w)
            b = tf.nn.conv2d(b, k, 1, "SAME")
        return tf.reduce_sum(tf.cast(a, tf.float32)) + tf.reduce_sum(tf.cast(b, tf.float32))

    return run


def _seconds(fn, repeats) -> float:
    t = time.perf_counter()
    fn(repeats).numpy()
    return time.perf_counter() - t


def _measure(device: str) -> Probe:
    import tensorflow as tf

    start = time.perf_counter()
    f32 = _work(tf.float32)
    f32(1).numpy()  # traced and warm
    try:
        bf16 = _work(tf.bfloat16)
        bf16(1).numpy()  # a device without bfloat16 kernels fails here
    except (tf.errors.OpError, TypeError, ValueError):
        return Probe(0.0, device, time.perf_counter() - start)
    repeats = 1
    while _seconds(f32, repeats) < _MIN_SECONDS and repeats < 1024:
        repeats *= 4
    seconds = in_turns({FLOAT32: lambda: f32(repeats).numpy(), BFLOAT16: lambda: bf16(repeats).numpy()}, _ROUNDS)
    speedup = seconds[FLOAT32] / seconds[BFLOAT16]
    return Probe(speedup, device, time.perf_counter() - start)
