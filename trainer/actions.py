"""What the training loop does besides stepping, one action each: summaries, the progress
bar, periodic checkpoints, SIGTERM, --max-steps, early stopping.

The loop (trainer/loop.py) calls every action at the same points, in list order:
  start_epoch(trainer, epoch, skip)    before the epoch's first batch (`skip`: already trained)
  after_step(trainer, step, out)       after each train step; a string return stops training
  stop_epoch(trainer)                  when the epoch's batches end, whatever the reason
  end_epoch(trainer, record, val)      after the epoch was validated, recorded and saved;
                                       a string return stops training
  close()                              once, at the end (also on errors)
The stop reason goes into metrics.json ("stopped").
"""
from __future__ import annotations

import signal
import sys

import tensorflow as tf

from caption_io import fileio


class Interrupted(Exception):
    """Training stopped by SIGTERM after saving a checkpoint."""


class Action:
    def start_epoch(self, trainer, epoch: int, skip: int) -> None:
        pass

    def after_step(self, trainer, step: int, out: dict) -> str | None:
        return None

    def stop_epoch(self, trainer) -> None:
        pass

    def end_epoch(self, trainer, record: dict, val: dict | None) -> str | None:
        return None

    def close(self) -> None:
        pass


class Summaries(Action):
    """TensorBoard scalars: train every `every` steps, val every epoch, on the global step."""

    def __init__(self, logs_dir: str, every: int = 10):
        self.every = every
        self.writers = {k: tf.summary.create_file_writer(fileio.join(logs_dir, k)) for k in ("train", "val")}

    def after_step(self, trainer, step, out):
        if step % self.every == 0:
            with self.writers["train"].as_default(step=step):
                for k in ("loss", "xent", "reg", "grad_norm"):
                    tf.summary.scalar(k, out[k])
                tf.summary.scalar("learning_rate", trainer.current_lr())
                tf.summary.scalar("tokens_per_s", trainer.tokens_per_s)

    def end_epoch(self, trainer, record, val):
        if val:
            with self.writers["val"].as_default(step=record["step"]):
                for k, v in val.items():
                    tf.summary.scalar(k, v)

    def close(self):
        for w in self.writers.values():
            w.flush()


class ProgressBar(Action):
    """A tqdm bar per epoch on stderr, with the loss and tokens/s."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        self.epochs, self.steps_per_epoch, self.bar = epochs, steps_per_epoch, None

    def start_epoch(self, trainer, epoch, skip):
        from tqdm import tqdm

        self.bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{self.epochs}",
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
    """Stop after `patience` epochs without a better val loss (the count is in the checkpoint)."""

    def __init__(self, patience: int):
        self.patience = patience

    def end_epoch(self, trainer, record, val):
        if val and int(trainer.bad_epochs) >= self.patience:
            return f"early stopping: no val improvement in {self.patience} epochs"
        return None
