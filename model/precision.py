"""The image encoder's compute precision: float32, or bfloat16 where this machine runs it clearly faster.

    choice = precision.choose("auto")                    # .precision: "float32" or "bfloat16"
    precision.set_compute(encoder, choice.precision)     # the backbone's layers compute in it
    features = precision.encode(encoder, pixels)         # float32 out, whatever it computed in

`--encoder-precision auto|float32|bfloat16` (preprocessing, the export, batch captioning) comes
here. `auto` is decided by measurement, never by the processor's name: `measure` times a float32
and a bfloat16 matrix product and 3x3 convolution of the encoders' sizes, interleaved, on the device
TensorFlow runs the encoder on (a GPU if it sees one, else the CPU), in under a second on a CPU,
and bfloat16 is chosen only when it runs at least MARGIN times as fast. CPUs with bfloat16 matrix
units (Intel AMX) can be; CPUs without them, where TensorFlow emulates bfloat16 (the AMD EPYC build
machines: no faster than float32, often slower), and GPUs without bfloat16 tensor cores are not.
float16 is never chosen. The measurement is made once a process.

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
_POLICIES = {FLOAT32: "float32", BFLOAT16: "mixed_bfloat16"}
_ROUNDS = 5
_MIN_SECONDS = 0.01  # each timed call at least this long (GPUs repeat the work inside it)


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


def choose(asked: str, probe=None, measurable: bool = True) -> Choice:
    """The precision to encode in. probe: what measures this machine (default `measure`; tests give
    their own); measurable False: the encoder runs elsewhere (a remote runner's workers), so auto
    keeps float32, unmeasured."""
    check(asked)
    if asked != AUTO:
        return Choice(asked, asked, "asked for")
    if not measurable:
        return Choice(asked, FLOAT32, f"auto, unmeasured: the workers are other machines; name {FLAG} bfloat16 "
                                      "for workers with bfloat16 matrix units")
    found = (probe or measure)()
    picked = BFLOAT16 if found.speedup >= MARGIN else FLOAT32
    why = (f"auto: bfloat16 measured {found.speedup:.2f}x float32's speed on this {found.device}, "
           f"{'at least' if picked == BFLOAT16 else 'under'} {MARGIN}x")
    return Choice(asked, picked, why, found.speedup)


def set_compute(model, precision: str) -> None:
    """Every layer of the Keras `model` (nested ones too) computes in `precision` from its next
    trace on; its variables are untouched."""
    if precision not in _POLICIES:
        raise PrecisionError(f"an encoder computes in float32 or bfloat16, not {precision!r} (choose() decides auto)")
    for layer in _layers(model):
        layer.dtype_policy = _POLICIES[precision]


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
    times = {tf.float32: [], tf.bfloat16: []}
    for r in range(_ROUNDS):
        for dtype, fn in ((tf.float32, f32), (tf.bfloat16, bf16))[:: 1 if r % 2 else -1]:
            times[dtype].append(_seconds(fn, repeats))
    speedup = statistics.median(times[tf.float32]) / statistics.median(times[tf.bfloat16])
    return Probe(speedup, device, time.perf_counter() - start)
