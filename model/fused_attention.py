"""One attention step and its gradient as two fused CPU kernels.

Training on a CPU spends most of the time loop on the attention's [n, 64, 512] tensors:
TensorFlow computes tanh(keys + query) . v in three ops and its gradient in six, each a pass
over memory, plus the softmax and the context around them. kernels/additive_attention.cc
does each direction in one pass. It is C++ against TensorFlow's own headers (tf.sysconfig),
compiled on first use with the machine's C++ compiler and cached per source, TensorFlow
version, compiler and CPU: tuned for this CPU where that compiles, else a portable build;
where neither is possible (no compiler, a GPU) training uses the TensorFlow ops, which compute
the same numbers (tests/test_fused_attention.py checks both against autodiff). The kernels take
float32 or bfloat16 tensors and compute in float32 either way: a bfloat16 step reads and writes
half the bytes, and its gradient accumulators stay float32.

    use = fused_attention.resolve("auto", "float32")   # True where the kernels serve
    context, weights, hidden = fused_attention.attend(features, keys, query, v)

Only the training recurrence uses the kernels; decoding and the SavedModel use TensorFlow ops,
so an export runs anywhere.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import tensorflow as tf

from caption_io import cli

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "additive_attention.cc")
CHOICES = ("auto", "fused", "ops")
DTYPES = ("float32", "bfloat16")  # the compute dtypes the kernels take
# The builds tried, in order. "tuned" targets this CPU (-march=native) but leaves out
# AVX512-FP16: with it on (Xeon Sapphire Rapids and later) TensorFlow's bundled Eigen headers
# stop g++ 12, and float32 kernels have no use for half-precision instructions. "portable" is
# the compiler's default target, for a CPU or compiler on which the tuned build still fails.
TUNED, PORTABLE = "tuned", "portable"
BUILDS = (TUNED, PORTABLE)
_BUILD_NAMES = {TUNED: "built for this CPU", PORTABLE: "portable build: the build for this CPU failed"}
log = logging.getLogger(__name__)

_lock = threading.Lock()
_module = None
_loaded_build: str | None = None
_error: str | None = None


class KernelError(RuntimeError, cli.UserError):
    """The fused kernels were asked for and cannot be used here (one readable line)."""


def cache_dir() -> str:
    """Where built kernels are kept: $SAT_KERNEL_CACHE, else ~/.cache/show-attend-tell."""
    if os.environ.get("SAT_KERNEL_CACHE"):
        return os.environ["SAT_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "show-attend-tell", "kernels")


def _cpu() -> str:
    """The CPU's model and instruction-set flags: -march=native code is only for this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def compiler() -> str | None:
    """The C++ compiler the kernels are built with: $CXX, else g++, else c++ (None: none here)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def _accepts(cxx: str, flag: str) -> bool:
    """Whether the compiler knows a flag (g++ learnt -mno-avx512fp16 in version 12)."""
    try:
        return subprocess.run([cxx, flag, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def target_flags(cxx: str, build: str, march: str = "native") -> list[str]:
    """The code-generation flags of one build (march: the CPU a tuned build is for)."""
    if build == PORTABLE:
        return []
    return [f"-march={march}"] + (["-mno-avx512fp16"] if _accepts(cxx, "-mno-avx512fp16") else [])


def _command(cxx: str, target: list[str], output: str) -> list[str]:
    return ([cxx, "-shared", "-fPIC", "-O3", *target, "-DNDEBUG", "-Wno-deprecated-declarations"]
            + tf.sysconfig.get_compile_flags() + [SOURCE, "-o", output] + tf.sysconfig.get_link_flags())


def compile_library(cxx: str, target: list[str], output: str) -> str | None:
    """Compile the kernels into output (written beside it and renamed, so processes that start
    together, the workers of one job, never load a half-written file). -> None, or the
    compiler's messages when it failed (output then absent)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(output) or ".")
    os.close(fd)
    try:
        done = subprocess.run(_command(cxx, target, tmp), capture_output=True, text=True, timeout=600)
        if done.returncode:
            return done.stderr.strip() or f"{cxx} exited with status {done.returncode}"
        os.replace(tmp, output)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library_path() -> str:
    """The built kernel library for this source, TensorFlow, compiler and CPU (built if missing:
    each build of BUILDS in turn until one compiles)."""
    cxx = compiler()
    if not cxx:
        raise KernelError("no C++ compiler found (install g++ or set CXX)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    tuned = " ".join(_command(cxx, target_flags(cxx, TUNED), "-"))
    key = hashlib.sha256(b"\0".join([source, tf.__version__.encode(), tuned.encode(),
                                     _cpu().encode()])).hexdigest()[:16]
    paths = {build: os.path.join(cache_dir(), f"additive_attention-{key}-{build}.so") for build in BUILDS}
    for build in BUILDS:   # a machine whose tuned build failed once keeps its portable one
        if os.path.exists(paths[build]):
            return paths[build]
    os.makedirs(cache_dir(), exist_ok=True)
    for build in BUILDS:
        messages = compile_library(cxx, target_flags(cxx, build), paths[build])
        if messages is None:
            return paths[build]
        log.debug("the %s build of %s failed:\n%s", build, os.path.basename(SOURCE), messages)
    raise KernelError(f"the fused CPU kernels did not compile with {cxx}; --verbose shows its messages")


def build_of(path: str) -> str:
    """Which of BUILDS a library from library_path is."""
    return os.path.splitext(path)[0].rsplit("-", 1)[-1]


def load():
    """The kernels' op module; raises KernelError (with the reason) where they cannot be built."""
    global _module, _error, _loaded_build
    with _lock:
        if _module is None and _error is None:
            try:
                path = library_path()
                _module, _loaded_build = tf.load_op_library(path), build_of(path)
            except KernelError as e:
                _error = str(e)
            except (OSError, tf.errors.OpError) as e:
                _error = f"the fused CPU kernels did not load: {e}".splitlines()[0]
        if _module is None:
            raise KernelError(_error)
        return _module


def loaded_build() -> str:
    """Which of BUILDS the loaded kernels are (loading them if need be)."""
    load()
    return _loaded_build


def describe() -> str:
    """The loaded kernels in a few words, for the line that says what a job trains with."""
    return f"fused CPU kernels ({_BUILD_NAMES[loaded_build()]})"


def unsupported_reason(compute_dtype: str, decoder: str = "gru") -> str | None:
    """Why the kernels do not apply to this job (None: they do)."""
    if decoder != "gru":
        return f"they compute the GRU's additive attention; the {decoder} decoder's is matmuls"
    if compute_dtype not in DTYPES:
        return f"they take {' or '.join(DTYPES)} tensors and the job computes in {compute_dtype}"
    if tf.config.list_physical_devices("GPU"):
        return "they are CPU kernels and this machine trains on its GPUs"
    return None


def resolve(choice: str, compute_dtype: str, decoder: str = "gru") -> bool:
    """--attention-kernel: 'ops' (TensorFlow ops), 'fused' (the kernels, or KernelError),
    'auto' (the kernels where they apply and build, else the ops, with the reason logged)."""
    if choice not in CHOICES:
        raise KernelError(f"attention kernel must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "ops":
        return False
    reason = unsupported_reason(compute_dtype, decoder)
    if reason is None:
        try:
            log.info("attention: %s", describe())
            return True
        except KernelError as e:
            reason = str(e)
    if choice == "fused":
        raise KernelError(f"--attention-kernel fused: not available: {reason}")
    # Not a warning for a decoder the kernels were never for: nothing was lost.
    (log.warning if decoder == "gru" else log.info)("attention: TensorFlow ops (%s)", reason)
    return False


def attend(features, keys, query, v):
    """model.attention.attend as one kernel: features [B, P, E], keys [B, P, U], query [n, U]
    (n <= B: the first n rows of features and keys are used), v [U], all float32 or all bfloat16 ->
    (context [n, E], weights [n, P] float32, tanh(keys + query) [n, P, U])."""
    return load().sat_additive_attention(features, keys, query, v)


def attend_grad(features, hidden, weights, d_context, d_weights, v, d_keys):
    """The gradient of attend, but for the features' (sum_t weights d_context, left to the
    caller): -> (d_query [n, U], d_v [U] float32, d_keys [B, P, U] float32 with this step's
    gradient added to its first n rows). weights, d_weights and d_keys are float32; the others
    are of attend's dtype."""
    return load().sat_additive_attention_grad(features, hidden, weights, d_context, d_weights,
                                              v, d_keys)
