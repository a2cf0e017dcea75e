"""What the training loop does besides stepping, one action each: summaries, the progress
bar, periodic checkpoints, SIGTERM, --max-steps, early stopping, the per-epoch caption
metrics and samples.

The loop (trainer/loop.py) calls every action at the same points, in list order:
  start_epoch(trainer, epoch, skip)    before the epoch's first batch (`skip`: already trained)
  after_step(trainer, step, out)       after each train step; a string return stops training
  stop_epoch(trainer)                  when the epoch's batches end, whatever the reason
  epoch_figures(trainer, epoch)        after the epoch's validation, before it is recorded and
                                       saved: -> figures for its record (history.json), which
                                       early stopping and checkpoints/best may follow
  end_epoch(epoch)                     after the epoch was validated, recorded and saved, with
                                       its EpochRecord (not the trainer); a string return stops
                                       training, an EndStage ends the cross-entropy stage
  close()                              once, at the end (also on errors)
The stop reason goes into metrics.json ("stopped").
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time

import tensorflow as tf

from caption_io import fileio


class Interrupted(Exception):
    """Training stopped by SIGTERM after saving a checkpoint."""


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """What an action is told of a finished epoch: its number (from 1, as in history.json), the
    global step after it, its stage, whether it was validated, how many validated epochs have gone
    by since the best on --early-stopping-metric (0: this one is the best), and its history record."""
    epoch: int
    step: int
    stage: str  # "cross-entropy" or "scst"
    validated: bool
    since_best: int
    figures: dict


@dataclasses.dataclass(frozen=True)
class EndStage:
    """An action's decision to end the cross-entropy stage: the loop goes on with the SCST epochs
    when the job has some (and saves that position), or stops with `reason` when it has none."""
    reason: str


class Action:
    def start_epoch(self, trainer, epoch: int, skip: int) -> None:
        pass

    def after_step(self, trainer, step: int, out: dict) -> str | None:
        return None

    def stop_epoch(self, trainer) -> None:
        pass

    def epoch_figures(self, trainer, epoch: int) -> dict:
        return {}

    def end_epoch(self, epoch: EpochRecord) -> str | EndStage | None:
        return None

    def close(self) -> None:
        pass


def _last_logged_step(run_dir: str) -> int:
    """The highest step any summary in the run's event files has (-1: none). A file cut short
    (the writer was killed) counts up to where it is whole."""
    last = -1
    for path in tf.io.gfile.glob(fileio.join(run_dir, "events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(path):  # an event file is TFRecords of Event protos
                event = tf.compat.v1.Event.FromString(record.numpy())
                if event.summary.value:
                    last = max(last, event.step)
        except tf.errors.DataLossError:
            pass
    return last


class EventLog:
    """The job's TensorBoard runs (logs/train, logs/val), one writer each, written so that every
    curve has one point a step however often the job was stopped and resumed.

    A resumed job can go back to a checkpoint older than its logs: the newest one was damaged,
    or SIGKILL came after the logs went past the last save. The steps it then trains again are
    the same steps (exact resume), already logged: `writer` gives no writer for a step at or below
    what the run's files held when the job started, so they are not logged twice.
    """

    RUNS = ("train", "val")

    def __init__(self, logs_dir: str):
        dirs = {run: fileio.join(logs_dir, run) for run in self.RUNS}
        self.logged = {run: _last_logged_step(d) for run, d in dirs.items()}  # before the new files exist
        self.writers = {run: tf.summary.create_file_writer(d) for run, d in dirs.items()}

    def writer(self, run: str, step: int):
        """The run's writer, or None when its files already hold `step`."""
        return self.writers[run] if step > self.logged[run] else None

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()


# An epoch record's figures (history.json keys) and their TensorBoard tags in the val run.
EPOCH_TAGS = {"val_loss": "loss", "val_xent": "xent", "val_reg": "reg",
              "train_reward": "scst/epoch_reward", "train_baseline": "scst/epoch_baseline",
              "scst_xent": "scst/epoch_xent",
              "epoch_seconds": "time/epoch_seconds", "val_seconds": "time/val_loss_seconds",
              "eval_seconds": "time/caption_metrics_seconds"}


class Summaries(Action):
    """TensorBoard scalars: train every `every` steps, and every epoch its record's figures (val
    loss, caption metrics, times) on the global step. An epoch of `history` whose figures the logs
    lack (the job stopped between its save and its summaries) is written when the job resumes."""

    # An SCST step's scalars (train run, tags scst/...): the mean sample reward (CIDEr-D, <end>
    # counted), the mean baseline, the loss (the surrogate, plus W times xent), the mean sample
    # length in tokens, and the reference captions' cross-entropy (--scst-xent-weight; 0 when off).
    SCST_SCALARS = ("reward", "baseline", "loss", "length", "xent")

    def __init__(self, log: EventLog, history: list[dict], every: int = 10):
        from trainer import epoch_eval

        self.log, self.every = log, every
        self.tags = dict(EPOCH_TAGS, **{f"val_{k}": f"captions/{k}" for k in epoch_eval.CAPTION_FIGURES})
        for record in history:
            self._write_epoch(record)

    def after_step(self, trainer, step, out):
        if step % self.every == 0 and (writer := self.log.writer("train", step)):
            with writer.as_default(step=step):
                if "reward" in out:  # an SCST step: the loss is the surrogate, tokens are sampled ones
                    for k in self.SCST_SCALARS:
                        tf.summary.scalar(f"scst/{k}", out[k])
                    tf.summary.scalar("scst/reward_share", float(out["reward_seconds"]) / max(trainer.step_seconds,
                                                                                               1e-9))
                    tf.summary.scalar("grad_norm", out["grad_norm"])
                else:
                    for k in ("loss", "xent", "reg", "grad_norm"):
                        tf.summary.scalar(k, out[k])
                tf.summary.scalar("learning_rate", trainer.current_lr())
                tf.summary.scalar("tokens_per_s", trainer.tokens_per_s)

    def end_epoch(self, epoch):
        self._write_epoch(epoch.figures)

    def _write_epoch(self, record: dict) -> None:
        writer = self.log.writer("val", record["step"])
        if writer is None:
            return
        with writer.as_default(step=record["step"]):
            for key, tag in self.tags.items():
                if record.get(key) is not None:
                    tf.summary.scalar(tag, record[key])

    def close(self):
        self.log.flush()


class EpochCaptions(Action):
    """The caption metrics of an epoch (trainer/epoch_eval.py) into its record, and on the chief
    its samples into TensorBoard's val run: per sample image a picture with one attention panel
    per word (tag samples/FILE_NAME: the same images every epoch, so the step slider shows them
    change), and one text of generated beside reference captions."""

    def __init__(self, evaluation, log: EventLog | None):
        self.evaluation, self.log, self.samples = evaluation, log, []

    def epoch_figures(self, trainer, epoch):
        start = time.time()
        found, self.samples = self.evaluation.run()
        return dict(found, eval_seconds=time.time() - start)

    def end_epoch(self, epoch):
        from trainer import epoch_eval

        writer = self.log.writer("val", epoch.step) if self.log and self.samples else None
        if writer is None:
            return
        with writer.as_default(step=epoch.step):
            for sample in self.samples:
                if sample["png"] is not None:  # an empty caption has no attention to draw
                    tf.summary.image(f"samples/{sample['file_name']}", tf.image.decode_png(sample["png"], 3)[None])
            tf.summary.text("samples/captions", epoch_eval.samples_markdown(self.samples, epoch.epoch))

    def close(self):
        self.evaluation.close()


class ProgressBar(Action):
    """A tqdm bar per epoch on stderr, with the loss and tokens/s."""

    def __init__(self, epochs: int):
        self.epochs, self.bar = epochs, None

    def start_epoch(self, trainer, epoch, skip):
        from tqdm import tqdm

        stage = " SCST" if trainer.in_scst(epoch) else ""
        self.bar = tqdm(total=trainer.epoch_steps(epoch), initial=skip, desc=f"epoch {epoch + 1}/{self.epochs}{stage}",
                        unit="step", file=sys.stderr, dynamic_ncols=True)

    def after_step(self, trainer, step, out):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(out['loss']):.3f}", tok_s=f"{trainer.tokens_per_s:,.0f}")

    def stop_epoch(self, trainer):
        self.close()

    def close(self):
        if self.bar:
            self.bar.close()
            self.bar = None


class PeriodicCheckpoint(Action):
    """A checkpoint every `every` steps (epoch ends are saved by the loop itself)."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, trainer, step, out):
        if step % self.every == 0:
            trainer.save(step)


class StopOnSigterm(Action):
    """SIGTERM (preemptible machines send it) saves a checkpoint at the next step and stops
    with Interrupted; the same command again goes on from there."""

    def __init__(self):
        self.received = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None

    def _handle(self, *_):
        self.received = True

    def after_step(self, trainer, step, out):
        if self.received:
            path = trainer.save(step)
            raise Interrupted(f"stopped by SIGTERM at step {step}; saved {path}; run the same command to continue")

    def close(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class MaxSteps(Action):
    """Stop once the global step reaches `max_steps` (the loop saves a mid-epoch position)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def after_step(self, trainer, step, out):
        return "max steps" if step >= self.max_steps else None


class EarlyStopping(Action):
    """End the cross-entropy stage after `patience` epochs without a better --early-stopping-metric:
    the job stops, or with --scst-epochs goes on to them. The epochs since the best are counted by
    trainer/best.py into the checkpoint, so a restarted job stops where it would have."""

    def __init__(self, patience: int, metric: str = "loss"):
        self.patience = patience
        self.what = "val improvement" if metric == "loss" else f"better val {metric}"

    def end_epoch(self, epoch):
        if epoch.stage == "scst":  # early stopping ends the cross-entropy stage only
            return None
        if not (epoch.validated and epoch.since_best >= self.patience):
            return None
        return EndStage(f"early stopping: no {self.what} in {self.patience} epochs")
