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


def test_pipeline_throughput_measures_the_chosen_backbone_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_throughput", "--encoder", "mobilenet_v3_large",
                           "--images", "8", "--batch-size", "4", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result["encoder"] == "mobilenet_v3_large"
    assert (result["input_size"], result["features"]) == (224, "7x7x960")
    assert result["feature_bytes_per_image"] == 49 * 960 * 2
    assert result["shard_bytes_per_image"] > result["feature_bytes_per_image"]
    assert result["encoder_images_per_s"] > 0 and result["pipeline_images_per_s"] > 0


def test_input_scale_writes_shards_the_trainer_streams(tmp_path):
    from benchmarks import input_scale
    from caption_io import metadata

    w = input_scale.write_split(str(tmp_path), images=30, n_shards=3)
    assert sorted(os.listdir(tmp_path)) == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    e = input_scale.stream_epoch(w["files"], batch=8)
    assert e["captions"] == 30 * input_scale.CAPTIONS_PER_IMAGE
    assert len(metadata.shard_files(str(tmp_path), "train")) == 3


def test_step_flops_counts_the_steps_matmuls_by_hand():
    from benchmarks.train_throughput import step_flops

    # A tiny step whose sizes are distinct primes (a factor swapped would change the count):
    U, E, V, P, F = 2, 3, 5, 7, 11          # units, embedding, vocabulary, positions, feature channels
    images, tokens = 2, 3
    # One multiply-add (MAC) is 2 FLOPs. Forward MACs of one target token's step:
    token_macs = (2 * (4 * 2)               # h [U] @ [U, 4U]: attention query | GRU recurrent gates = 16
                  + 7 * 2                   # scores: v . tanh(keys + query), [P, U] @ [U]          = 14
                  + 7 * 3                   # context: alpha [P] @ features [P, E]                   = 21
                  + 3 * (3 * 2)             # context [E] @ [E, 3U]: GRU input gates                 = 18
                  + 3 * (3 * 2)             # word embedding [E] @ [E, 3U]: GRU input gates          = 18
                  + 2 * 2                   # fc1: [U] @ [U, U]                                       =  4
                  + 2 * 5)                  # fc2: [U] @ [U, V]                                       = 10
    assert token_macs == 101
    # Forward MACs once per image:
    encoder_macs = 7 * 11 * 3               # stored features [P, F] @ [F, E]                       = 231
    image_macs = (7 * 3 * 2                 # attention keys W1 f: [P, E] @ [E, U]                  =  42
                  + 3 * 2)                  # h0: mean feature [E] @ [E, U]                          =   6
    # Backward = 2x forward (input and weight gradients), so forward + backward = 3x; the encoder's
    # input is data, so it has a weight gradient only: forward + backward = 2x.
    per_token = 3 * token_macs                              # 303
    per_image = 2 * encoder_macs + 3 * image_macs           # 462 + 144 = 606
    want = 2 * (images * per_image + tokens * per_token)    # 2 * (1212 + 909) = 4242 FLOPs
    assert want == 4242
    got = step_flops(images, tokens, units=U, embed=E, vocab=V, pos=P, feat=F)
    assert got == want
    # Images and tokens add: padding costs nothing, one more token is one token's share.
    assert step_flops(images, 0, units=U, embed=E, vocab=V, pos=P, feat=F) == 2 * images * per_image
    assert step_flops(0, tokens + 1, units=U, embed=E, vocab=V, pos=P, feat=F) == 2 * (tokens + 1) * per_token


def test_transformer_step_flops_counts_its_matmuls_by_hand():
    from benchmarks.train_throughput import transformer_step_flops

    D, E, V, P, F, FF, L = 2, 3, 5, 7, 11, 13, 2   # width, embedding, vocabulary, cells, channels, ff, blocks
    images, lengths = 2, [1, 2]                  # captions of 1 and 2 real target tokens
    block_macs = (D * 3 * D                      # words' q, k, v: [D] @ [D, 3D]                   = 12
                  + D * D                        # self-attention output                            =  4
                  + D * D                        # cross-attention query                            =  4
                  + D * D                        # cross-attention output                           =  4
                  + D * FF + FF * D)             # feed-forward in and out                          = 52
    assert block_macs == 76
    token_macs = L * block_macs + D * V          # the blocks, then the vocabulary projection = 162
    # Attention at a position: q.k and weights.v over the t words up to it and the P cells, D wide.
    seen = 1 + (1 + 2)                           # the 1-token caption sees 1 word; the other 1, then 2
    attention_macs = L * 2 * D * (seen + 3 * P)  # 2 * 2 * 2 * (4 + 21) = 200
    encoder_macs = P * F * E                     # 231
    image_macs = L * P * E * 2 * D               # each block's cells' keys and values = 168
    want = 2 * (images * (2 * encoder_macs + 3 * image_macs) + 3 * (3 * token_macs + attention_macs))
    got = transformer_step_flops(images, lengths, units=D, embed=E, vocab=V, pos=P, feat=F, layers=L, ff=FF)
    assert got == want == 2 * (2 * (462 + 504) + 3 * (486 + 200))


def test_step_profile_counts_each_ops_own_time_on_tensorflows_threads():
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from benchmarks.step_profile import self_times

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    for i, name in enumerate(["ExecutorState::Process", "dense/MatMul:MatMul", "fc/BiasAdd:_FusedMatMul",
                              "gru/Tanh:Tanh", "train_step"]):
        plane.event_metadata[i + 1].name = name

    def events(line, *spans):   # (metadata id, start, duration) in picoseconds
        for meta, start, duration in spans:
            line.events.add(metadata_id=meta, offset_ps=start, duration_ps=duration)

    # the executor (0-100) runs a matmul (10-40) with a tanh inside it (20-25), then a fused matmul (50-90)
    events(plane.lines.add(name="tf_Compute/1"), (1, 0, 100), (2, 10, 30), (4, 20, 5), (3, 50, 40))
    events(plane.lines.add(name="python"), (5, 0, 120))    # the caller, waiting: not counted
    totals = self_times(space)
    assert totals == {"(executor)": 30, "MatMul": 25, "Tanh": 5, "_FusedMatMul": 40}


def test_precision_quality_compares_the_captions_image_by_image():
    from benchmarks.precision_quality import compare

    f32 = {"CIDEr": 2.0, "captions": {1: "a red square", 2: "a blue circle", 3: "a green star"}}
    bf16 = {"CIDEr": 1.96, "captions": {1: "a red square", 2: "a blue square", 3: "a green star", 4: "extra"}}
    summary = compare({"float32": f32, "bfloat16": bf16})
    assert summary == {"cider_ratio": pytest.approx(0.98), "same_captions": 2, "images": 3,
                       "agreement": pytest.approx(2 / 3)}
