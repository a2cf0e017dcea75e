"""Where the train step's time goes, by TensorFlow op type, in float32 and in bfloat16.

    python -m benchmarks.step_profile [--length 24] [--steps 5] [--decoder gru] [--top 15]

The step of benchmarks.train_throughput (the tutorial's shapes: batch 64, units 512, 64 positions
of 2,048 channels), run under tf.profiler for --steps steps after two of warm-up, in three
variants: float32 with the attention kernels the trainer uses here, bfloat16 with them, and
bfloat16 with TensorFlow ops. The host's op events are summed by op type, each op's own time (its
nested ops' taken out), and printed in milliseconds a step: the rows where bfloat16 gains or loses.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

from benchmarks.train_throughput import built_step

VARIANTS = {"float32": (False, "auto"), "bfloat16": (True, "auto"), "bfloat16, ops": (True, "ops")}  # (bf16, kernel)
_OP = re.compile(r"^[\w/.\-]+:(_?[A-Z]\w*)$")   # a TensorFlow op's event: "scope/name:OpType" (_FusedMatMul too)


def op_type(event_name: str) -> str:
    """An op event's type; anything else on TensorFlow's threads is the executor's own work."""
    found = _OP.match(event_name)
    return found.group(1) if found else "(executor)"


def _close(stack: list, until: float, totals: collections.Counter) -> None:
    """Ends the open events that end by `until`: each adds its own time, and its whole to its parent's nested."""
    while stack and stack[-1][0] <= until:
        _, name, duration, nested = stack.pop()
        totals[op_type(name)] += duration - nested
        if stack:
            stack[-1][3] += duration


def self_times(space) -> collections.Counter:
    """Picoseconds by op type over the host planes of an XSpace, each event's own time, on TensorFlow's
    threads (the calling Python thread only waits for the step)."""
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            if line.name == "python":
                continue
            stack = []   # open events: [end, name, duration, nested time]
            for start, duration, name in sorted((e.offset_ps, e.duration_ps, names.get(e.metadata_id, ""))
                                                for e in line.events):
                _close(stack, start, totals)
                stack.append([start + duration, name, duration, 0])
            _close(stack, float("inf"), totals)
    return totals


def profile(length: int, steps: int, bfloat16: bool, kernel: str, decoder: str) -> tuple[dict, float]:
    """-> (ms a step by op type, wall ms a step)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    s, batches = built_step(length, bfloat16, False, kernel, decoder)
    for i in range(2):
        float(s.train_step(batches[i])["loss"])
    logdir = tempfile.mkdtemp(prefix="step-profile-")
    tf.profiler.experimental.start(logdir)
    began = time.perf_counter()
    for i in range(steps):
        float(s.train_step(batches[i % len(batches)])["loss"])
    wall = (time.perf_counter() - began) / steps
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    return {op: ps / 1e9 / steps for op, ps in self_times(space).items()}, wall * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=24, help="caption length of the batches (default 24)")
    ap.add_argument("--steps", type=int, default=5, help="steps profiled per variant (default 5)")
    ap.add_argument("--decoder", default="gru", choices=("gru", "transformer"))
    ap.add_argument("--top", type=int, default=15, help="op types shown (default 15)")
    a = ap.parse_args(argv)
    runs, walls = {}, {}
    for name, (bfloat16, kernel) in VARIANTS.items():
        runs[name], walls[name] = profile(a.length, a.steps, bfloat16, kernel, a.decoder)
    ops = sorted(set().union(*runs.values()), key=lambda op: -max(r.get(op, 0.0) for r in runs.values()))
    print("RESULT " + json.dumps({"wall_ms_per_step": walls, "ms_per_step": runs}))
    print(f"\nms per step by op type (own time, summed over threads), length {a.length}, decoder {a.decoder}")
    print(f"{'op type':28}" + "".join(f"{n:>16}" for n in runs))
    for op in ops[:a.top]:
        print(f"{op:28}" + "".join(f"{r.get(op, 0.0):16.1f}" for r in runs.values()))
    print(f"{'all ops (thread time)':28}" + "".join(f"{sum(r.values()):16.1f}" for r in runs.values()))
    print(f"{'wall time a step':28}" + "".join(f"{w:16.1f}" for w in walls.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
