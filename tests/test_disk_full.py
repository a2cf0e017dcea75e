"""A full disk under shards, checkpoints, summaries or the export: one line naming the
path, nothing half-written left under a final name, and a rerun with space ends as an
undisturbed run does. The disk is a real tmpfs, filled (conftest.small_disk)."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import tensorflow as tf

from caption_io import checkpoints, datadir, metadata
from caption_serving import export
from trainer import task

TRAIN = ["--units", "64", "--embedding-dim", "32", "--batch-size", "8", "--no-progress", "--no-export",
         "--eval-images", "0"]  # per-epoch caption metrics: tests/test_epoch_metrics.py


def _train(data, job, epochs, capsys):
    rc = task.main(["--data", data, "--job-dir", str(job), "--epochs", str(epochs), *TRAIN])
    return rc, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """Three epochs with nothing in the way: the history a disturbed job must end with."""
    job = tmp_path_factory.mktemp("reference")
    assert task.main(["--data", small_data, "--job-dir", str(job), "--epochs", "3", *TRAIN]) == 0
    return json.load(open(job / "history.json"))


def _same_history(a, b):
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        for k in ("train_loss", "val_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7)


def test_a_checkpoint_refused_by_a_full_disk_leaves_nothing_half_written(small_data, reference, small_disk,
                                                                         tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    os.symlink(small_disk.path, job / "checkpoints")  # the checkpoints, alone, on the small disk
    assert _train(small_data, job, 1, capsys)[0] == 0
    first = checkpoints.listed(str(job / "checkpoints"))
    assert [os.path.basename(p) for p in first] == ["ckpt-9"]

    small_disk.fill(leave=64 * 1024)  # far less than a checkpoint: its data file fails part-way
    rc, line = _train(small_data, job, 3, capsys)
    assert rc == 2
    assert line == (f"error: cannot write {job}/checkpoints/ckpt-18: no space left on device; the newest "
                    "checkpoint, ckpt-9, is whole: free some space (or copy the job elsewhere) and run the same "
                    "command again, it goes on from there")
    # TF wrote into ckpt-18_temp/ and failed; nothing of ckpt-18 is left, and the list is unchanged.
    assert not [f for f in os.listdir(small_disk.path) if f.startswith("ckpt-18")]
    assert checkpoints.listed(str(job / "checkpoints")) == first

    small_disk.make_room()
    rc, line = _train(small_data, job, 3, capsys)
    assert rc == 0, line
    _same_history(json.load(open(job / "history.json")), reference)


def test_summaries_refused_by_a_full_disk_name_the_event_file(small_data, reference, small_disk, tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    os.symlink(small_disk.path, job / "logs")  # TensorBoard's files, alone, on the small disk
    small_disk.fill()
    rc, line = _train(small_data, job, 3, capsys)
    assert rc == 2
    assert re.fullmatch(rf"error: cannot write {job}/logs/(train|val)/events\.out\.tfevents\.\S+: no space left on "
                        r"device; .*run the same command again.*", line), line

    small_disk.make_room()
    rc, line = _train(small_data, job, 3, capsys)
    assert rc == 0, line
    _same_history(json.load(open(job / "history.json")), reference)
    assert os.listdir(job / "logs" / "train")


def test_an_export_refused_by_a_full_disk_keeps_the_previous_export(trained_job, small_disk, capsys):
    from caption_serving.client import export_info, load_model

    out = os.path.join(small_disk.path, "export")
    shutil.copytree(os.path.join(trained_job, "export"), out)  # the previous export (the fixture's)
    before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs}
    capsys.readouterr()

    small_disk.fill(leave=1 << 20)  # a SavedModel with its InceptionV3 is tens of MB
    assert export.main(["--job-dir", trained_job, "--output", out]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot write {out}: no space left on device"
    # The old export is untouched and whole; the new one's staging folder is gone.
    assert sorted(os.listdir(small_disk.path)) == ["export", "filler"]
    assert {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs} == before
    load_model(out)

    small_disk.make_room()
    assert export.main(["--job-dir", trained_job, "--output", out]) == 0
    info = export_info(out)  # (the new export loads: test_export)
    assert info["checkpoint"] == tf.train.latest_checkpoint(os.path.join(trained_job, "checkpoints"))


def test_shards_refused_by_a_full_disk_then_a_rerun_finishes_the_same_data(scene_dir, small_data, small_disk,
                                                                          capsys):
    from pipelines import preprocess, validate

    out = os.path.join(small_disk.path, "data")
    args = ["--coco-dir", scene_dir, "--output", out, "--encoder-weights", "random", "--seed", "1",
            "--num-shards", "train=2,val=1"]  # as small_data was made
    # Room for the encoder's weights and the small files, not for a shard (each over 1 MB).
    encoder = os.path.getsize(os.path.join(small_data, datadir.encoder_file("inception_v3")))
    small_disk.fill(leave=encoder + 512 * 1024)
    assert preprocess.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {out}/(train|val)-\d{{5}}-of-\d{{5}}\.tfrecord: no space left on "
                        r"device; free some space and run the same command again: .*", line), line
    assert not os.path.exists(os.path.join(out, "metadata.json"))

    small_disk.make_room()
    assert preprocess.main(args) == 0
    assert validate.main([out, "--full"]) == 0
    made, want = (metadata.read(d).splits for d in (out, small_data))
    assert {s: v.files for s, v in made.items()} == {s: v.files for s, v in want.items()}
    shutil.rmtree(out)


def test_small_files_refused_by_a_full_disk_leave_neither_half_a_file_nor_a_temporary(small_disk):
    from caption_io import fileio

    path = os.path.join(small_disk.path, "sub", "metadata.json")
    fileio.write_json(path, {"a": 1})
    small_disk.fill()
    with pytest.raises(fileio.WriteError) as e:
        fileio.write_bytes(path, b"x" * (1 << 20))
    assert str(e.value) == f"cannot write {path}: no space left on device"
    assert os.listdir(os.path.dirname(path)) == ["metadata.json"] and fileio.read_json(path) == {"a": 1}
    with pytest.raises(fileio.WriteError, match=f"cannot write {small_disk.path}/w.weights.h5: no space left"):
        fileio.write_through_local(os.path.join(small_disk.path, "w.weights.h5"),
                                   lambda local: open(local, "wb").write(b"\0" * (1 << 20)))
    assert sorted(os.listdir(small_disk.path)) == ["filler", "sub"]
