"""The training loop: strategy, compiled step, checkpoints, resume.

`Trainer.run` is a short outer loop: `train_epoch` steps and accumulates, `end_epoch`
validates, records and saves, and everything else (summaries, the progress bar, periodic
checkpoints, SIGTERM, --max-steps, early stopping) is an action (trainer/actions.py)
called at fixed points. What the loop runs is built apart (trainer/build.py: data, resolved
settings, steps, checkpoint; trainer/inputs.py: the datasets), its counters are one object
(trainer/state.py) beside the best epochs so far (trainer/best.py), and what a job writes about
itself is trainer/report.py's.

The model, loss and inputs are single-replica code (model/, trainer/data.py);
this module runs them on whatever tf.distribute strategy the machine calls for.

Resuming: the checkpoint holds the model, the optimizer (and so the step),
the dropout RNG state, the epoch and the number of batches already trained in
it. Each epoch's data order is fixed by (seed, epoch), so a restarted run skips
exactly the batches it had trained on and continues with the same ones an
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import os
import sys
import time

import keras
import tensorflow as tf

from caption_io import checkpoints, fileio, jobdir, metadata
from trainer import actions as actions_lib
from trainer import build, distribute, report
from trainer.actions import Interrupted  # noqa: F401 - callers catch loop.Interrupted
from trainer.best import BY_METRIC, BestEpochs
from trainer.build import model_config  # noqa: F401 - importable from here as before
from trainer.build import resolve_jit as _resolve_jit  # noqa: F401 - importable from here as before
from trainer.errors import TrainError
from trainer.inputs import Inputs
from trainer.settings import Settings
from trainer.state import LoopState


class Trainer:
    def __init__(self, s: Settings):
        self.s = s
        # First: MultiWorkerMirroredStrategy must exist before any TensorFlow op runs.
        self.strategy = distribute.get_strategy(s.strategy)
        self.meta = meta = metadata.read(s.data)
        self.vocab = metadata.load_vocab(s.data, meta)
        self.feature_shape = meta.features.shape
        self.train_files, self.val_files = build.shard_files(s, meta)
        mean, std = metadata.load_feature_stats(s.data, meta)
        # Before the seed is set: auto's measurement builds throwaway models.
        self.config, self.precision = build.resolve_config(
            s, meta, len(self.vocab), build.train_precision(s, meta, self.strategy, mean, std, self.train_files))

        keras.utils.set_random_seed(s.seed)
        self.chief = distribute.is_chief(self.strategy)
        plan = build.plan(s, meta, self.strategy.num_replicas_in_sync)
        self.steps_per_epoch, self.scst_steps_per_epoch, self.total_epochs, self.jit_compile, self.buckets = plan
        self.steps = build.caption_steps(s, self.config, mean, std, self.strategy, plan)
        self.model, self.optimizer = self.steps.model, self.steps.optimizer
        self.inputs = Inputs(s, self.strategy, self.feature_shape, self.train_files, self.buckets, self.jit_compile)
        # The loop's counters and the best epochs so far: host variables (outside the strategy's
        # scope, so they are not mirrored), saved in the checkpoint with the model.
        self.state, self.best = LoopState(), BestEpochs(s.early_stopping_metric)
        self.scst = build.scst_steps(s, meta, self.steps, self.train_files, self.chief) if s.scst_epochs else None
        self.checkpoint = build.checkpoint(self.model, self.optimizer,
                                           {**self.state.checkpointed(), **self.best.checkpointed()},
                                           scst_optimizer=self.scst.optimizer if self.scst else None)
        self.checkpoint_dir = fileio.join(s.job_dir, jobdir.CHECKPOINTS)
        self.manager, self.best_manager = build.managers(s, self.checkpoint, self.chief, self.strategy)

    @property
    def scst_steps(self) -> tf.Variable:
        """SCST steps trained (the global step is the optimizer's iterations plus these)."""
        return self.state.scst_steps

    def in_scst(self, epoch: int | None = None) -> bool:
        """Whether `epoch` (default: the current one) is of the SCST stage."""
        return (int(self.state.epoch) if epoch is None else epoch) >= self.s.epochs

    def epoch_steps(self, epoch: int) -> int:
        return self.scst_steps_per_epoch if self.in_scst(epoch) else self.steps_per_epoch

    def _dataset(self, files, epoch, shuffle, skip=0):
        return self.inputs.captions(files, epoch, shuffle, skip)

    # ------------------------------------------------------------------ loop
    def validate(self, epoch) -> dict | None:
        if not self.val_files:
            return None
        total = {"loss": 0.0, "xent": 0.0, "reg": 0.0, "tokens": 0}
        batches = self._dataset(self.val_files, epoch, shuffle=False)
        if self.steps.eval_step is None:  # a job resumed into its SCST stage has not built the cross-entropy steps
            self.steps.build(batches.element_spec)
        for batch in batches:
            out = self.steps.eval_step(batch)
            # Each batch's loss is divided by its own token count: weight it back.
            n = int(out["tokens"])
            for k in ("loss", "xent", "reg"):
                total[k] += float(out[k]) * n
            total["tokens"] += n
        n = max(total["tokens"], 1)
        return {k: total[k] / n for k in ("loss", "xent", "reg")}

    def _stop_if_not_finite(self, out, step) -> None:
        """A NaN or infinite loss or gradient norm has already been applied to the weights:
        stop before anything is saved from this state, so the last checkpoint stays the good one."""
        loss, norm = float(out["loss"]), float(out["grad_norm"])
        if math.isfinite(loss) and math.isfinite(norm):
            return
        last = self.manager.latest_checkpoint if self.chief else None
        kept = f"the last checkpoint ({os.path.basename(last)}) is intact" if last else "no checkpoint was written"
        flag = ("--scst-learning-rate", self.s.scst_learning_rate) if self.in_scst() else \
            ("--learning-rate", self.s.learning_rate)
        raise TrainError(f"step {step}: loss {loss}, gradient norm {norm}: stopped before saving this state "
                         f"({kept}). Likely causes: a learning rate too high for this model ({flag[0]} "
                         f"{flag[1]}: lower it and run the command again to go on from the checkpoint), "
                         f"or features that are not finite (`python -m pipelines.validate {self.s.data} --full`)")

    def _restore_newest_intact(self) -> str | None:
        """Restore the newest checkpoint that reads back whole; say in one line which newer
        ones were damaged (cut short by a full disk, a partial copy) and why. -> its path."""
        path, damaged = checkpoints.restore_newest_intact(self.checkpoint_dir, self.checkpoint.restore)
        if path is None and damaged:
            raise TrainError(f"{self.checkpoint_dir}: no intact checkpoint ({'; '.join(damaged)}); move the folder "
                             "away to start this job afresh, or put back an undamaged copy")
        if damaged:
            print(f"checkpoint damaged: {'; '.join(damaged)}; restored {os.path.basename(path)}, the newest "
                  "intact one, and training goes on from there", file=sys.stderr)
        return path

    def save(self, step: int, best: bool = False) -> str:
        return checkpoints.save(self.best_manager if best else self.manager, step)

    def run(self) -> dict:
        """Train (or go on training) to the end. A refused write (a full disk) stops it with one
        TrainError line naming the file, and what a rerun with space goes on from."""
        try:
            with fileio.writing(None):  # summaries and job files; checkpoints name themselves
                return self._run()
        except fileio.WriteError as e:
            last = self.manager.latest_checkpoint
            after = (f"the newest checkpoint, {os.path.basename(last)}, is whole: free some space (or copy the job "
                     "elsewhere) and run the same command again, it goes on from there") if last else \
                "no checkpoint was written: free some space and run the same command again"
            raise TrainError(f"{e}; {after}") from None

    def _run(self) -> dict:
        self._start()
        actions = self._actions()
        start_time, reason = time.time(), None
        self.trained_tokens = 0
        try:
            while reason is None and int(self.state.epoch) < self.total_epochs:
                epoch = int(self.state.epoch)
                reason = self.train_epoch(actions)
                # its batches are all trained (also when an action stopped it at the last one)
                if reason is None or int(self.state.step_in_epoch) >= self.epoch_steps(epoch):
                    done = self.end_epoch(actions)
                    for a in actions:
                        reason = self._act_on(a.end_epoch(done)) or reason
                elif reason:  # stopped mid-epoch (--max-steps): keep the position for a later run
                    self.save(self.global_step())
        finally:
            for a in actions:
                a.close()
        return self._finish(reason or "epochs done", time.time() - start_time)

    def _act_on(self, decision: str | actions_lib.EndStage | None) -> str | None:
        """What an action decided after an epoch -> the reason to stop training, or None. An
        EndStage with SCST epochs to come ends the cross-entropy stage; without, it stops."""
        if not isinstance(decision, actions_lib.EndStage):
            return decision
        if not self.s.scst_epochs:
            return decision.reason
        self.end_cross_entropy(decision.reason)
        return None

    def end_cross_entropy(self, reason: str) -> None:
        """End the cross-entropy stage before its --epochs (early stopping): the job goes on with
        SCST from here, and a restart does too (the position is saved)."""
        print(f"{reason}: the cross-entropy stage ends at epoch {int(self.state.epoch)}; SCST starts",
              file=sys.stderr)
        self.state.epoch.assign(self.s.epochs)
        self.best.new_stage()
        self.save(self.global_step())

    def _start(self) -> str | None:
        """Restore (every worker, from the chief's checkpoints: the only real ones), record the
        job, and measure where the val loss starts. -> the restored checkpoint or None."""
        s = self.s
        restored = self._restore_newest_intact()
        if self.chief:
            report.write_job(s, self.config, self.meta.encoder)
        self.history = report.read_history(s.job_dir, int(self.state.epoch)) if restored else []
        if restored:
            print(f"resuming from {restored}: epoch {int(self.state.epoch) + 1}, step {self.global_step()}",
                  file=sys.stderr)
        self.initial_val = self._initial_val(restored)
        return restored

    def _initial_val(self, restored: str | None) -> dict | None:
        """Where the val loss starts, measured by a new job (the yardstick for "learned" in
        metrics.json), read back by a resumed one."""
        path = report.initial_val_path(self.s.job_dir)
        if not restored and self.val_files:
            val = self.validate(0)
            if self.chief:
                fileio.write_json(path, val)
            return val
        if restored and fileio.exists(path):
            return fileio.read_json(path)
        return None

    def _actions(self) -> list[actions_lib.Action]:
        s, found, log = self.s, [], None
        if self.chief:
            log = actions_lib.EventLog(fileio.join(s.job_dir, jobdir.LOGS))
            found.append(actions_lib.Summaries(log, self.history))
        if self.val_files and s.eval_images:
            from trainer import epoch_eval

            evaluation = epoch_eval.EpochEvaluation(self.model, self.meta, self.vocab, self.val_files, s.eval_images,
                                                    s.samples if self.chief else 0)
            found.append(actions_lib.EpochCaptions(evaluation, log))
        if sys.stderr.isatty() if s.progress is None else s.progress:
            found.append(actions_lib.ProgressBar(self.total_epochs))
        if s.checkpoint_every:
            found.append(actions_lib.PeriodicCheckpoint(s.checkpoint_every))
        found.append(actions_lib.StopOnSigterm())
        if s.max_steps:
            found.append(actions_lib.MaxSteps(s.max_steps))
        if s.early_stopping:
            found.append(actions_lib.EarlyStopping(s.early_stopping, BY_METRIC[s.early_stopping_metric].label))
        return found

    def train_epoch(self, actions) -> str | None:
        """Step through the rest of the current epoch, accumulating its loss. -> the reason
        an action stopped it early, or None when its batches ran out."""
        epoch, skip = int(self.state.epoch), int(self.state.step_in_epoch)
        scst = self.in_scst(epoch)
        ds = self._epoch_dataset(epoch, skip, scst)
        for a in actions:
            a.start_epoch(self, epoch, skip)
        self._epoch_start, self._epoch_tokens_this_run, self._epoch_reward_seconds = time.time(), 0, 0.0
        reason = None
        for batch in ds:
            began = time.time()
            out = self._scst_step(batch) if scst else self.steps.train_step(batch)
            step = self.global_step()
            self._stop_if_not_finite(out, step)
            n = self.state.add_step(out)
            self._epoch_tokens_this_run += n
            self.trained_tokens += n
            self.tokens_per_s = self._epoch_tokens_this_run / max(time.time() - self._epoch_start, 1e-9)
            self.step_seconds = time.time() - began
            for a in actions:
                reason = a.after_step(self, step, out) or reason
            if reason:
                break
        self._epoch_seconds = time.time() - self._epoch_start
        for a in actions:
            a.stop_epoch(self)
        return reason

    def _epoch_dataset(self, epoch: int, skip: int, scst: bool):
        """The rest of the epoch's batches, its stage's steps built for them on first use."""
        if scst:  # self.scst exists: total_epochs counts SCST epochs only with --scst-epochs
            ds = self.inputs.scst_images(epoch, skip)
            if self.scst.train_step is None:
                self.scst.build(ds.element_spec, self.s.batch_size // self.strategy.num_replicas_in_sync)
            return ds
        ds = self._dataset(self.train_files, epoch, shuffle=True, skip=skip)
        if self.steps.train_step is None:
            self.steps.build(ds.element_spec)
        return ds

    def _scst_step(self, batch) -> dict:
        """One SCST step, its draws seeded by (--seed, SCST step): a resumed run draws what an
        uninterrupted one would have. Its reward and baseline (means per sample) go into the epoch's sums."""
        from trainer import scst

        out = self.scst.train_step(batch, scst.step_seed(self.s.seed, int(self.state.scst_steps)))
        self.state.add_scst_step(out)
        self._epoch_reward_seconds += float(out["reward_seconds"])
        return out

    def end_epoch(self, actions=()) -> actions_lib.EpochRecord:
        """Validate, add the actions' figures (the caption metrics), record the epoch in history.json,
        move the position to the next epoch and save it (and checkpoints/best when the epoch is the
        best so far on --early-stopping-metric). -> what the actions are told of the epoch."""
        epoch, seconds, scst = int(self.state.epoch), self._epoch_seconds, self.in_scst()
        record = {"epoch": epoch + 1, "step": self.global_step(),
                  **self.state.train_figures(scst, seconds, self._epoch_reward_seconds),
                  "tokens_per_s": self._epoch_tokens_this_run / max(seconds, 1e-9), "epoch_seconds": seconds}
        start = time.time()
        val = self.validate(epoch)
        if val:
            record.update(val_loss=val["loss"], val_xent=val["xent"], val_reg=val["reg"],
                          val_seconds=time.time() - start)
        for a in actions:
            record.update(a.epoch_figures(self, epoch))
        print(report.epoch_line(record, self.total_epochs), file=sys.stderr)
        improved = self.best.judge(record)
        self.history.append(record)
        # history.json before the checkpoint: a job stopped between the two has a record that its
        # checkpoint lacks, which the restart drops and writes again; the other order would lose it.
        if self.chief:
            report.write_history(self.s.job_dir, self.history)
        self.state.next_epoch()
        self.save(self.global_step())
        if improved:
            self.save(self.global_step(), best=True)
        return actions_lib.EpochRecord(epoch=epoch + 1, step=record["step"], stage="scst" if scst else "cross-entropy",
                                       validated=bool(val), since_best=self.best.since_best(), figures=record)

    def _finish(self, reason: str, seconds: float) -> dict:
        metrics = report.final_metrics(
            self.history, steps=self.global_step(), epochs_completed=int(self.state.epoch),
            scst_steps=int(self.state.scst_steps), best_loss=self.best.value("loss"),
            best_cider=self.best.value("cider"), metric=self.s.early_stopping_metric, initial_val=self.initial_val,
            reason=reason, seconds=seconds, tokens=self.trained_tokens, replicas=self.strategy.num_replicas_in_sync,
            fused=self.steps.fused_attention, jit_compile=self.jit_compile, precision=self.precision)
        if self.chief:
            report.write_final(self.s.job_dir, metrics)
            self.save_weights()
        return metrics

    def global_step(self) -> int:
        """Steps of both stages: cross-entropy (the optimizer's iterations) and SCST."""
        # iterations is a mirrored variable under a strategy: read it as a tensor.
        return int(tf.convert_to_tensor(self.optimizer.iterations.value)) + int(self.state.scst_steps)

    def current_lr(self):
        optimizer = self.scst.optimizer if self.scst is not None and self.in_scst() else self.optimizer
        lr = optimizer.learning_rate
        return lr(optimizer.iterations) if callable(lr) else lr

    def save_weights(self) -> str:
        """The trained weights and what rebuilds them, for export."""
        return report.save_weights(self.s.job_dir, self.model, self.config)


def train(s: Settings) -> dict:
    return Trainer(s).run()
