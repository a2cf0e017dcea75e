"""Watching a run learn: per-epoch caption metrics, samples and times in TensorBoard and
history.json, equal to the evaluation's figures for the same checkpoint; early stopping and
checkpoints/best on CIDEr; resumes that keep one point per epoch."""
from __future__ import annotations

import json
import os

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from caption_eval import evaluate
from caption_eval.evaluators import coco_metrics
from caption_io import checkpoints, metadata, savedmodel
from tests.test_trainer import _cut_short
from trainer import actions, loop, task

SMALL = ["--units", "64", "--embedding-dim", "32", "--batch-size", "8", "--no-progress"]
STEPS_PER_EPOCH = 9  # the small scene set's 70 captions in batches of 8


def _settings(data, job, *extra):
    return task.parse_args(["--data", data, "--job-dir", str(job), *SMALL, *extra])


def _events(run_dir):
    """{tag: [steps]} of a TensorBoard run, read with TensorBoard's own reader, keeping every
    event (no purge of out-of-order steps: the files themselves must hold one point a step)."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.TENSORS: 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    return {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()[event_accumulator.TENSORS]}, acc


def test_epoch_metrics_samples_and_resumes_in_tensorboard_equal_the_evaluation(small_data, tmp_path, capsys):
    job = tmp_path / "job"
    common = ("--epochs", "3", "--learning-rate", "3e-3", "--samples", "2", "--checkpoint-every", "4",
              "--keep-checkpoints", "5")
    # Stopped in the middle of epoch 3, with checkpoints at steps 12, 16, 18 (epoch 2's end), 20 and 22;
    # the newest three are then damaged, so the resumed job goes back to the middle of epoch 2: it
    # trains again steps (18, 20) and an epoch end (18) its logs already hold.
    loop.train(_settings(small_data, job, *common, "--max-steps", "22"))
    for step in (18, 20, 22):
        _cut_short(str(job / "checkpoints" / f"ckpt-{step}"))
    m = loop.train(_settings(small_data, job, *common))
    assert "restored ckpt-16" in capsys.readouterr().err
    epoch_ends = [STEPS_PER_EPOCH * e for e in (1, 2, 3)]

    history = json.load(open(job / "history.json"))
    assert [h["step"] for h in history] == [h["step"] for h in m["history"]] == epoch_ends
    n_val = metadata.read(small_data).splits["val"].images.written
    for h in history:
        assert h["eval_images"] == n_val  # the default --eval-images covers the small val split
        assert h["eval_seconds"] > 0 and h["epoch_seconds"] > 0
        for key in coco_metrics.METRIC_KEYS:
            assert 0 <= h[f"val_{key}"] <= 10, key

    val, acc = _events(job / "logs" / "val")
    for tag in ("loss", "captions/BLEU-4", "captions/METEOR", "captions/ROUGE-L", "captions/CIDEr",
                "time/epoch_seconds", "time/caption_metrics_seconds", "samples/captions"):
        assert val.get(tag) == epoch_ends, (tag, val.get(tag))
    # Attention correctness where some word named an object of its image.
    assert val.get("captions/attention_share", []) == [h["step"] for h in history if "val_attention_share" in h]
    cider = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("captions/CIDEr")]
    assert cider == pytest.approx([h["val_CIDEr"] for h in history])
    images = sorted(tag for tag in val if tag.startswith("samples/") and tag != "samples/captions")
    assert len(images) == 2  # the same two images every epoch
    for tag in images:
        assert val[tag] == epoch_ends, tag  # (no caption of this run is empty: an empty one has no plot)
        png = tf.make_ndarray(acc.Tensors(tag)[-1].tensor_proto)[2]  # [width, height, png bytes]
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = tf.make_ndarray(acc.Tensors("samples/captions")[-1].tensor_proto).item().decode()
    assert text.startswith("epoch 3,") and "| generated | references |" in text
    train, _ = _events(job / "logs" / "train")
    assert train["loss"] == [10, 20]

    # The epoch's figures are the evaluation's for its checkpoint: greedy, the export's length.
    from caption_serving import export

    out = export.export(str(job))
    info = json.load(open(os.path.join(out, savedmodel.EXPORT_INFO)))
    assert info["default_max_length"] == savedmodel.default_max_length(metadata.read(small_data).max_tokens)
    scores = evaluate.evaluate(out, small_data, beam_size=1, gallery_size=0, output=str(tmp_path / "eval"))
    last = history[-1]
    for key in coco_metrics.METRIC_KEYS:
        assert last[f"val_{key}"] == pytest.approx(scores[key], abs=1e-9), key
    attention = scores["attention_correctness"]
    assert last.get("val_attention_share") == (pytest.approx(attention["share"], abs=1e-9) if attention["words"]
                                               else None)


def test_early_stopping_on_cider_keeps_its_state_across_a_restart_and_exports_the_best(
        small_data, tmp_path, monkeypatch, capsys):
    # CIDEr scripted per epoch (the rest of the scoring is as ever): best at epoch 2, then worse.
    cider = iter([0.2, 0.5, 0.4, 0.45, 0.3, 0.3, 0.3, 0.3])

    def scripted(gts, res, meteor):
        value = next(cider)
        return (dict({k: 0.1 for k in coco_metrics.METRIC_KEYS}, CIDEr=value, n_images=len(gts),
                     n_empty_captions=0), {i: value for i in gts})

    monkeypatch.setattr(coco_metrics, "_score", scripted)
    monkeypatch.setattr(coco_metrics.Meteor, "start", lambda self: self)  # scripted: no Java needed
    from caption_serving import export

    def exported(job_dir, checkpoint):  # what the export would restore (the SavedModel itself: test_trainer)
        return export.build_module(job_dir, checkpoint=checkpoint)[1]["checkpoint"]

    monkeypatch.setattr(export, "export", exported)
    job = tmp_path / "job"
    argv = ["--data", small_data, "--job-dir", str(job), *SMALL, "--epochs", "8", "--early-stopping", "2",
            "--early-stopping-metric", "cider", "--samples", "0", "--export", "best", "--no-eval"]
    # Stopped after epoch 3 (one epoch without a better CIDEr), then the same command again: a
    # restart that forgot the count or the best would go on past epoch 4.
    assert task.main([*argv, "--max-steps", str(3 * STEPS_PER_EPOCH), "--no-export"]) == 0
    assert task.main(argv) == 0
    m = json.load(open(job / "metrics.json"))
    assert m["stopped"] == "early stopping: no better val CIDEr in 2 epochs"
    assert m["epochs_completed"] == 4 and m["best_val_cider"] == 0.5
    assert [h["val_CIDEr"] for h in m["history"]] == [0.2, 0.5, 0.4, 0.45]
    best = checkpoints.listed(str(job / "checkpoints" / "best"))
    assert [os.path.basename(p) for p in best] == [f"ckpt-{2 * STEPS_PER_EPOCH}"]
    assert f"exported the SavedModel of the best checkpoint to {best[0]}" in capsys.readouterr().err


def test_a_resume_writes_the_epochs_its_logs_lack_and_not_those_they_hold(tmp_path):
    # The job stopped after saving epoch 2 but before its summaries: the logs end at epoch 1.
    first = actions.EventLog(str(tmp_path))
    with first.writers["val"].as_default(step=9):
        tf.summary.scalar("loss", 2.0)
    first.flush()
    with first.writers["train"].as_default(step=10):
        tf.summary.scalar("loss", 3.0)
    first.flush()
    (train_file,) = (tmp_path / "train").iterdir()
    with open(train_file, "r+b") as f:  # the writer was killed half-way through its one event
        f.truncate(os.path.getsize(train_file) - 5)
    history = [{"epoch": 1, "step": 9, "val_loss": 2.0}, {"epoch": 2, "step": 18, "val_loss": 1.5, "val_CIDEr": 0.7}]
    log = actions.EventLog(str(tmp_path))
    assert log.logged == {"train": -1, "val": 9}
    actions.Summaries(log, history).close()
    val, acc = _events(tmp_path / "val")
    assert sorted(val["loss"]) == [9, 18] and val["captions/CIDEr"] == [18]  # (two files of one second: any order)
    assert {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")} == {9: 2.0, 18: 1.5}


@pytest.mark.parametrize("flags,words", [
    (["--early-stopping-metric", "bleu"], "--early-stopping-metric"),
    (["--early-stopping-metric", "cider", "--eval-images", "0"], "--early-stopping-metric cider needs"),
    (["--export", "best", "--no-validate"], "--export best needs validation"),
    (["--eval-images", "-1"], "--eval-images must be at least 0"),
    (["--eval-images", "2", "--samples", "3"], "--samples 3: at most --eval-images (2)"),
])
def test_bad_epoch_metric_flags_are_one_error_line(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        task.parse_args(["--data", "d", "--job-dir", "j", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_no_export_is_export_none():
    assert task.parse_args(["--data", "d", "--job-dir", "j", "--no-export"]).export == "none"
    assert task.parse_args(["--data", "d", "--job-dir", "j"]).export == "last"
