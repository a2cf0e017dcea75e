"""One attention step and its gradient as two fused CPU kernels.

Training on a CPU spends most of the time loop on the attention's [n, 64, 512] tensors:
TensorFlow computes tanh(keys + query) . v in three ops and its gradient in six, each a pass
over memory, plus the softmax and the context around them. kernels/additive_attention.cc
does each direction in one pass. It is C++ against TensorFlow's own headers (tf.sysconfig),
compiled on first use with the machine's C++ compiler and cached per source, TensorFlow
version and CPU (`-march=native`); where that is not possible (no compiler, a GPU, bfloat16)
training uses the TensorFlow ops, which compute the same numbers
(tests/test_fused_attention.py checks both against autodiff).

    use = fused_attention.resolve("auto", "float32")   # True where the kernels serve
    context, weights, hidden = fused_attention.attend(features, keys, query, v)

Only the training recurrence uses the kernels; decoding and the SavedModel use TensorFlow ops,
so an export runs anywhere.
"""
from __future__ import annotations

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
log = logging.getLogger(__name__)

_lock = threading.Lock()
_module = None
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


def _command(output: str) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelError("no C++ compiler found (install g++ or set CXX)")
    return ([cxx, "-shared", "-fPIC", "-O3", "-march=native", "-DNDEBUG", "-Wno-deprecated-declarations"]
            + tf.sysconfig.get_compile_flags() + [SOURCE, "-o", output] + tf.sysconfig.get_link_flags())


def library_path() -> str:
    """The built kernel library for this source, TensorFlow and CPU (built if missing)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, tf.__version__.encode(), " ".join(_command("-")).encode(),
                                     _cpu().encode()])).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"additive_attention-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    # Build beside the target and rename: processes that start together (the workers of
    # one job) each build their own file and none loads a half-written one.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        done = subprocess.run(_command(tmp), capture_output=True, text=True, timeout=600)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
            raise KernelError(f"compiling {os.path.basename(SOURCE)} failed: {lines[0].strip() if lines else '?'}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load():
    """The kernels' op module; raises KernelError (with the reason) where they cannot be built."""
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                _module = tf.load_op_library(library_path())
            except KernelError as e:
                _error = str(e)
            except (OSError, subprocess.SubprocessError, tf.errors.OpError) as e:
                _error = f"the fused attention kernels did not build or load: {e}".splitlines()[0]
        if _module is None:
            raise KernelError(_error)
        return _module


def unsupported_reason(compute_dtype: str) -> str | None:
    """Why the kernels do not apply to this job (None: they do)."""
    if compute_dtype != "float32":
        return f"they compute in float32 and the job computes in {compute_dtype}"
    if tf.config.list_physical_devices("GPU"):
        return "they are CPU kernels and this machine trains on its GPUs"
    return None


def resolve(choice: str, compute_dtype: str) -> bool:
    """--attention-kernel: 'ops' (TensorFlow ops), 'fused' (the kernels, or KernelError),
    'auto' (the kernels where they apply and build, else the ops, with the reason logged)."""
    if choice not in CHOICES:
        raise KernelError(f"attention kernel must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "ops":
        return False
    reason = unsupported_reason(compute_dtype)
    if reason is None:
        try:
            load()
            return True
        except KernelError as e:
            reason = str(e)
    if choice == "fused":
        raise KernelError(f"--attention-kernel fused: not available: {reason}")
    log.warning("attention: TensorFlow ops (%s)", reason)
    return False


def attend(features, keys, query, v):
    """model.attention.attend as one kernel: features [B, P, E], keys [B, P, U], query [n, U]
    (n <= B: the first n rows of features and keys are used), v [U] ->
    (context [n, E], weights [n, P], tanh(keys + query) [n, P, U]), float32."""
    return load().sat_additive_attention(features, keys, query, v)


def attend_grad(features, hidden, weights, d_context, d_weights, v, d_keys):
    """The gradient of attend, but for the features' (sum_t weights d_context, left to the
    caller): -> (d_query [n, U], d_v [U], d_keys [B, P, U] with this step's gradient added to
    its first n rows)."""
    return load().sat_additive_attention_grad(features, hidden, weights, d_context, d_weights,
                                              v, d_keys)
