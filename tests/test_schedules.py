"""What changes over a training run: the learning rate (--lr-schedule, --warmup-steps) and
when the run stops (--early-stopping PATIENCE)."""
from __future__ import annotations

import json
import math

import pytest

from caption_io import metadata
from trainer import loop, task

# Per-epoch caption metrics off: tests/test_epoch_metrics.py has them (they cost seconds an epoch here).
SMALL = ["--units", "64", "--embedding-dim", "32", "--batch-size", "8", "--no-progress", "--eval-images", "0"]
PEAK = 0.01


def _settings(data, job, *extra):
    return task.parse_args(["--data", data, "--job-dir", str(job), *SMALL, *extra])


def _total_steps(data_dir, batch_size, epochs):
    """The run's steps, from the data set: every training caption once an epoch, in batches."""
    captions = metadata.read(data_dir).splits["train"].captions.written
    return math.ceil(captions / batch_size) * epochs


def _learning_rates(data_dir, job, flags, steps):
    """The learning rate the trainer's optimizer applies at each of these global steps."""
    trainer = loop.Trainer(_settings(data_dir, job, "--learning-rate", str(PEAK), *flags))
    out = []
    for step in steps:
        trainer.optimizer.iterations.assign(step)
        out.append(float(trainer.optimizer.learning_rate))
    return out


def _cosine(step, warmup, total, floor=0.01):
    """Cosine decay from PEAK at the warmup's end to floor * PEAK at the run's last step."""
    progress = min(max(step - warmup, 0) / (total - warmup), 1.0)
    return PEAK * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_schedule_with_warmup(small_data, tmp_path):
    epochs, warmup = 4, 6
    total = _total_steps(small_data, 8, epochs)                      # 70 captions: 9 steps an epoch
    assert total > 3 * warmup and (total - warmup) % 2 == 0, "pick epochs/warmup: a long run, an even decay"
    middle = warmup + (total - warmup) // 2
    steps = [0, warmup // 2, warmup - 1, warmup, warmup + 1, middle, total - 1, total, total + 50]
    got = dict(zip(steps, _learning_rates(small_data, tmp_path / "job", ["--epochs", str(epochs), "--lr-schedule",
                                                                      "cosine", "--warmup-steps", str(warmup)], steps)))
    assert got[0] == 0.0                                             # warmup starts from nothing
    assert got[warmup // 2] == pytest.approx(PEAK * (warmup // 2) / warmup, rel=1e-5)   # linear: half way, half
    assert got[warmup - 1] == pytest.approx(PEAK * (warmup - 1) / warmup, rel=1e-5)
    assert got[warmup] == pytest.approx(PEAK, rel=1e-5)              # the peak at the end of warmup
    assert got[warmup + 1] < PEAK                                    # then it decays
    for step in (warmup + 1, middle, total - 1):
        assert got[step] == pytest.approx(_cosine(step, warmup, total), rel=1e-4), step
    # Half way through the decay: half way between the peak and the 1% floor.
    assert got[middle] == pytest.approx(PEAK * (0.01 + 0.99 * 0.5), rel=1e-2)
    assert got[total] == pytest.approx(0.01 * PEAK, rel=1e-4)        # the last step: 1% of the peak
    assert got[total + 50] == pytest.approx(0.01 * PEAK, rel=1e-4)   # and no lower after it


def test_cosine_schedule_without_warmup_starts_at_the_peak(small_data, tmp_path):
    epochs = 3
    total = _total_steps(small_data, 8, epochs)
    steps = [0, 1, total // 2, total]
    got = _learning_rates(small_data, tmp_path / "job", ["--epochs", str(epochs), "--lr-schedule", "cosine"], steps)
    assert got[0] == pytest.approx(PEAK, rel=1e-6)
    assert got[0] > got[1] > got[2] > got[3]
    assert got[2] == pytest.approx(_cosine(total // 2, 0, total), rel=1e-4)
    assert got[3] == pytest.approx(0.01 * PEAK, rel=1e-4)


def test_constant_schedule_with_and_without_warmup(small_data, tmp_path):
    total = _total_steps(small_data, 8, 2)
    steps = [0, 1, 2, 4, 5, 6, total, total + 100]
    warm = _learning_rates(small_data, tmp_path / "warm", ["--epochs", "2", "--warmup-steps", "5"], steps)
    want = [0.0, PEAK * 1 / 5, PEAK * 2 / 5, PEAK * 4 / 5, PEAK, PEAK, PEAK, PEAK]   # linear ramp, then flat
    assert warm == pytest.approx(want, rel=1e-5)
    flat = _learning_rates(small_data, tmp_path / "flat", ["--epochs", "2"], steps)
    assert flat == pytest.approx([PEAK] * len(steps), rel=1e-6)


def _first_stop(val_losses, patience):
    """The epoch (1-based) after which --early-stopping PATIENCE must stop: the first with
    PATIENCE epochs in a row that did not beat the best val loss before them (None: never)."""
    best, bad = math.inf, 0
    for epoch, loss in enumerate(val_losses, 1):
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad >= patience:
            return epoch
    return None


def test_early_stopping_stops_patience_epochs_after_the_best_val_loss(small_data, tmp_path):
    # A learning rate this high makes the val loss stop improving within a few epochs (seed 0;
    # tests/test_trainer.py's best-checkpoint test uses the same), well before --epochs 10.
    patience, epochs = 2, 10
    m = loop.train(_settings(small_data, tmp_path / "job", "--epochs", str(epochs), "--learning-rate", "3e-2",
                             "--early-stopping", str(patience), "--no-export"))
    val = [h["val_loss"] for h in m["history"]]
    stop = _first_stop(val, patience)
    assert stop is not None and stop < epochs, \
        f"val loss {val}: never {patience} epochs without improvement: the test needs a run that stops improving"
    assert len(val) == stop == m["epochs_completed"]                # it stopped there, not before or after
    assert m["stopped"].startswith("early stopping"), m["stopped"]
    assert f"{patience} epochs" in m["stopped"]
    best = min(range(len(val)), key=val.__getitem__)
    assert best == len(val) - 1 - patience                         # the best epoch, then PATIENCE worse ones
    assert all(v >= val[best] for v in val[best + 1:])
    assert m["best_val_loss"] == pytest.approx(val[best])
    with open(tmp_path / "job" / "metrics.json") as f:
        assert json.load(f)["stopped"] == m["stopped"]
