"""SCST as the second stage of `python -m trainer.task`: --epochs of cross-entropy, then
--scst-epochs of self-critical training; a job that has done its cross-entropy epochs goes
straight to SCST, and a run stopped inside SCST resumes to exactly the uninterrupted result."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import N_TRAIN
from trainer import loop, task

SMALL = ["--units", "64", "--embedding-dim", "32", "--batch-size", "8", "--no-progress", "--no-eval",
         "--export", "none", "--checkpoint-every", "0", "--seed", "3", "--epochs", "2", "--eval-images", "0"]
SCST = ["--scst-epochs", "2", "--scst-samples", "4", "--scst-learning-rate", "5e-4"]
XE_STEPS = 2 * -(-N_TRAIN * 5 // 8)     # two epochs of 70 captions in batches of 8
SCST_STEPS_PER_EPOCH = -(-N_TRAIN // 8)  # 14 images in batches of 8


def _run(data, job, *extra):
    trainer = loop.Trainer(task.parse_args(["--data", data, "--job-dir", str(job), *SMALL, *extra]))
    return trainer, trainer.run()


def _weights(trainer):
    return {v.path: tf.convert_to_tensor(v.value).numpy() for v in trainer.model.trainable_variables}


def _scalars(run_dir, tag):
    """(step, value) of a tf.summary.scalar tag (TF 2 writes scalars as tensor events)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}, purge_orphaned_data=False)
    acc.Reload()
    found = acc.Tensors(tag) if tag in acc.Tags()["tensors"] else []
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in found]


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    """The whole job in one run, with the per-epoch caption metrics on (the val greedy CIDEr)."""
    job = tmp_path_factory.mktemp("scst") / "job"
    trainer, metrics = _run(small_data, job, *SCST, "--eval-images", "5", "--samples", "1")
    return {"job": job, "metrics": metrics, "weights": _weights(trainer)}


def test_scst_follows_the_cross_entropy_epochs_and_is_recorded(uninterrupted):
    job, m = uninterrupted["job"], uninterrupted["metrics"]
    total = XE_STEPS + 2 * SCST_STEPS_PER_EPOCH
    assert m["steps"] == total and m["scst_steps"] == 2 * SCST_STEPS_PER_EPOCH and m["epochs_completed"] == 4
    history = json.load(open(job / "history.json"))
    assert [h.get("stage") for h in history] == [None, None, "scst", "scst"]
    assert [h["step"] for h in history] == [XE_STEPS // 2, XE_STEPS, XE_STEPS + SCST_STEPS_PER_EPOCH, total]
    for h in history[2:]:
        assert "train_loss" not in h and 0 < h["train_reward"] < 10 and 0 <= h["train_baseline"] < 10
        assert 1 <= h["sample_length"] and 0 < h["reward_share"] < 1 and h["tokens_per_s"] > 0
        assert "val_CIDEr" in h and "val_loss" in h  # the val greedy caption's CIDEr every SCST epoch too
    assert m["final_train_reward"] == history[-1]["train_reward"]
    assert m["final_train_loss"] == history[1]["train_loss"]  # the cross-entropy stage's last
    assert os.path.exists(job / "cider_df.npz")
    # TensorBoard: each SCST step's reward and baseline (train run, every 10th global step as for the
    # loss), the epoch means and the greedy CIDEr on val per epoch (val run).
    rewards = _scalars(job / "logs" / "train", "scst/reward")
    assert [s for s, _ in rewards] == [s for s in range(XE_STEPS + 1, total + 1) if s % 10 == 0]
    assert _scalars(job / "logs" / "train", "scst/baseline")
    assert [s for s, _ in _scalars(job / "logs" / "val", "scst/epoch_reward")] == [h["step"] for h in history[2:]]
    cider = _scalars(job / "logs" / "val", "captions/CIDEr")
    assert [s for s, _ in cider] == [h["step"] for h in history]
    np.testing.assert_allclose([v for _, v in cider], [h["val_CIDEr"] for h in history], rtol=1e-6)


def test_a_job_done_with_cross_entropy_goes_to_scst_and_resumes_inside_it_exactly(uninterrupted, small_data,
                                                                                     tmp_path):
    job = tmp_path / "job"
    _, first = _run(small_data, job)                                 # cross-entropy only, to the end
    assert first["steps"] == XE_STEPS and first["scst_steps"] == 0
    _, second = _run(small_data, job, *SCST, "--max-steps", str(XE_STEPS + 1))  # straight to SCST, 1 step
    assert second["stopped"] == "max steps" and second["scst_steps"] == 1
    trainer, third = _run(small_data, job, *SCST)                    # resumed inside the first SCST epoch
    assert third["steps"] == uninterrupted["metrics"]["steps"]
    mine, theirs = json.load(open(job / "history.json")), uninterrupted["metrics"]["history"]
    for key in ("step", "train_reward", "train_baseline", "sample_length", "val_loss"):
        np.testing.assert_allclose([h.get(key, 0) for h in mine], [h.get(key, 0) for h in theirs], rtol=1e-6,
                                   err_msg=key)
    # The surrogate loss sums advantage-weighted log-probabilities whose advantages nearly cancel: CPU
    # reductions that run in another thread order move it by 2e-6 of itself between identical runs,
    # so it is held to an absolute 1e-6 as well (another draw would move it by orders more).
    np.testing.assert_allclose([h.get("scst_loss", 0) for h in mine], [h.get("scst_loss", 0) for h in theirs],
                               rtol=1e-6, atol=1e-6, err_msg="scst_loss")
    # The weights likewise: the references' cross-entropy term (on by default) adds reductions whose
    # thread order moves a few weights by ~2e-7 between identical runs. An Adam step at this test's
    # rate moves a weight by ~5e-4, so a resume that lost a step, the optimizer or the draws is still
    # hundreds of times past the bar.
    got = _weights(trainer)
    for k, v in uninterrupted["weights"].items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_the_mean_baseline_needs_two_samples(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        task.parse_args(["--data", small_data, "--job-dir", str(tmp_path), "--scst-epochs", "1",
                         "--scst-samples", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--scst-samples 1" in err[-1] and "greedy" in err[-1]


def test_early_stopping_ends_the_cross_entropy_stage_and_scst_follows(small_data, tmp_path, monkeypatch, capsys):
    """A val loss that only gets worse stops cross-entropy after --early-stopping epochs; the job
    then goes on to its SCST epochs (numbered after --epochs) instead of ending."""
    losses = iter([5.0, 6.0, 7.0, 8.0])
    monkeypatch.setattr(loop.Trainer, "validate",
                        lambda self, epoch: dict.fromkeys(("loss", "xent", "reg"), next(losses)))
    _, m = _run(small_data, tmp_path / "job", "--epochs", "4", "--early-stopping", "1", "--scst-epochs", "1",
                "--scst-samples", "2")
    assert [(h["epoch"], h.get("stage")) for h in m["history"]] == [(1, None), (2, None), (5, "scst")]
    assert m["stopped"] == "epochs done" and m["scst_steps"] == SCST_STEPS_PER_EPOCH
    assert "the cross-entropy stage ends at epoch 2; SCST starts" in capsys.readouterr().err
