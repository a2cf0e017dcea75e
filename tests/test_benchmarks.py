"""The benchmark scripts run (their figures are measured elsewhere, not asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_without_a_gpu_says_so_and_exits_0(tmp_path):
    # A machine whose nvidia-smi finds no GPU (as on CI), whatever this machine has.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no GPU on this machine (nvidia-smi lists none): nothing to measure"


@pytest.mark.slow
def test_gpu_benchmark_runs_every_path_at_toy_sizes():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert set(result["encoder_images_per_s"]) == {"batch2_float32", "batch2_bfloat16"}
    assert set(result["train_step"]) == {"batch4_bfloat16_graph", "batch4_bfloat16_xla",
                                         "batch4_float32_graph", "batch4_float32_xla"}
    assert all(r["real_tokens_per_s"] > 0 and 0 < r["mfu"] for r in result["train_step"].values())


def test_input_scale_writes_shards_the_trainer_streams(tmp_path):
    from benchmarks import input_scale
    from trainer import data

    w = input_scale.write_split(str(tmp_path), images=30, n_shards=3)
    assert sorted(os.listdir(tmp_path)) == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    e = input_scale.stream_epoch(w["files"], batch=8)
    assert e["captions"] == 30 * input_scale.CAPTIONS_PER_IMAGE
    assert len(data.shard_files(str(tmp_path), "train")) == 3
