"""A data directory checked against what the pipeline recorded: the trainer refuses a
damaged shard before its first step, and `pipelines.validate` says what is wrong."""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import subprocess
import sys

import pytest

from caption_io import metadata
from pipelines import validate
from trainer import loop, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def copy(small_data, tmp_path):
    out = str(tmp_path / "data")
    shutil.copytree(small_data, out)
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.validate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _train_shard(data_dir, i=0):
    return sorted(glob.glob(os.path.join(data_dir, "train-*.tfrecord")))[i]


def test_a_whole_data_directory_passes_both_checks(copy):
    for flags in ([], ["--full"]):
        proc = _cli(copy, *flags)
        assert proc.returncode == 0, proc.stderr
        assert "train: 2 shards" in proc.stdout and "val: 1 shards" in proc.stdout
        assert proc.stdout.count(": ok") == 2 and "whole" in proc.stdout.splitlines()[-1]
    assert "read " in _cli(copy, "--full").stdout  # the full check did read the records


def test_a_truncated_shard_is_named_by_validate_and_refused_by_the_trainer(copy, tmp_path):
    shard = _train_shard(copy, 1)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    proc = _cli(copy)
    assert proc.returncode == 1
    assert f"{shard}: {size // 2:,} bytes where metadata.json says {size:,}: cut short" in proc.stderr
    assert "re-run `python -m pipelines.preprocess`" in proc.stderr
    # The trainer: one line before the first step, exit 2, no traceback.
    with pytest.raises(metadata.MetadataError, match=os.path.basename(shard)):
        loop.Trainer(task.parse_args(["--data", copy, "--job-dir", str(tmp_path / "job")]))
    run = subprocess.run([sys.executable, "-m", "trainer.task", "--data", copy, "--job-dir", str(tmp_path / "job2"),
                          "--epochs", "1", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {shard}: ") and "cut short" in last
    assert not os.path.exists(tmp_path / "job2" / "checkpoints")


def test_a_missing_shard_is_named(copy):
    shard = _train_shard(copy, 0)
    os.remove(shard)
    proc = _cli(copy)
    assert proc.returncode == 1 and f"{shard}: missing" in proc.stderr
    with pytest.raises(metadata.MetadataError, match="missing"):
        metadata.shard_files(copy, "train", metadata.read(copy))


def test_a_flipped_byte_passes_the_size_check_and_fails_the_full_one(copy):
    shard = _train_shard(copy, 0)
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert _cli(copy).returncode == 0  # same size: only reading it can tell
    proc = _cli(copy, "--full")
    assert proc.returncode == 1
    assert f"{shard}: its sha256 differs" in proc.stderr and f"{shard}: unreadable after" in proc.stderr


def test_counts_that_differ_from_metadata_fail_the_full_check(copy):
    meta = metadata.read(copy)
    val = meta.splits["val"]
    more = dataclasses.replace(val, captions=dataclasses.replace(val.captions, written=val.captions.written + 1))
    metadata.write(copy, dataclasses.replace(meta, splits={**meta.splits, "val": more}))
    problems = validate.validate(copy, full=True)[1]
    assert problems and problems[0].startswith("val: ")
    assert "captions in the shards where metadata.json says" in problems[0]


def test_not_a_data_directory_exits_2(tmp_path):
    proc = _cli(str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]  # (TensorFlow's start-up lines may come first)
    assert proc.returncode == 2 and last.startswith("error: ") and "no metadata.json" in last
