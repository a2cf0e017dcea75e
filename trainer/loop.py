"""The training loop: strategy, compiled step, checkpoints, resume.

`Trainer.run` is a short outer loop: `train_epoch` steps and accumulates, `end_epoch`
validates, records and saves, and everything else (summaries, the progress bar, periodic
checkpoints, SIGTERM, --max-steps, early stopping) is an action (trainer/actions.py)
called at fixed points.

The model, loss and inputs are single-replica code (model/, trainer/data.py);
this module runs them on whatever tf.distribute strategy the machine calls for.

Resuming: the checkpoint holds the model, the optimizer (and so the step),
the dropout RNG state, the epoch and the number of batches already trained in
it. Each epoch's data order is fixed by (seed, epoch), so a restarted run skips
exactly the batches it had trained on and continues with the same ones an
uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from caption_io import checkpoints, cli, fileio, jobdir, metadata
from caption_io.jobdir import CONFIG_FILE
from model import CaptionerConfig, fused_attention
from trainer import actions as actions_lib
from trainer import data, distribute
from trainer.actions import Interrupted  # noqa: F401 - callers catch loop.Interrupted
from trainer.settings import JIT_CHOICES, Settings
from trainer.steps import CaptionSteps


class TrainError(ValueError, cli.UserError):
    """A job that cannot start (one readable line, before any training)."""


def model_config(s: Settings, vocab_size: int) -> CaptionerConfig:
    return CaptionerConfig(vocab_size=vocab_size, embedding_dim=s.embedding_dim, units=s.units,
                           dropout=s.dropout, attention_reg=s.attention_reg, gate=s.gate,
                           compute_dtype="bfloat16" if s.mixed_precision else "float32")


def _resolve_jit(choice: str, replicas: int) -> bool:
    """auto: XLA where it pays and works, one GPU (the step's collectives stay outside
    XLA, so several replicas keep the graph step); on: always (one replica); off: never."""
    if choice not in JIT_CHOICES:
        raise TrainError(f"--jit-compile {choice}: choose one of {', '.join(JIT_CHOICES)}")
    if choice == "on" and replicas > 1:
        raise TrainError(f"--jit-compile on works with one replica; this job has {replicas} "
                         "(use --jit-compile auto or off)")
    if choice == "auto":
        return replicas == 1 and bool(tf.config.list_logical_devices("GPU"))
    return choice == "on"


def _resolve_config(s: Settings, vocab_size: int) -> CaptionerConfig:
    """The config of a new job, or the saved one of a job being resumed (which
    must agree with the data and the flags)."""
    wanted = model_config(s, vocab_size)
    path = fileio.join(s.job_dir, CONFIG_FILE)
    if not fileio.exists(path):
        return wanted
    saved = CaptionerConfig.from_json(fileio.read_text(path))
    if saved.vocab_size != vocab_size:
        raise TrainError(f"--job-dir {s.job_dir}: its checkpoint has vocab size {saved.vocab_size} "
                         f"but --data {s.data} has {vocab_size}; use a new --job-dir")
    diff = {k: (v, getattr(wanted, k)) for k, v in saved.to_dict().items() if getattr(wanted, k) != v}
    if diff:
        k, (old, new) = next(iter(diff.items()))
        raise TrainError(f"--job-dir {s.job_dir}: the job was started with {k}={old}, now {k}={new}; "
                         "resume with the same flags or use a new --job-dir")
    return saved


def _learning_rate(s: Settings, total_steps: int):
    if s.lr_schedule == "constant":
        if s.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=1, alpha=1.0, warmup_target=s.learning_rate, warmup_steps=s.warmup_steps)
        return s.learning_rate
    if s.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if s.warmup_steps else s.learning_rate, decay_steps=max(1, total_steps - s.warmup_steps),
            warmup_target=s.learning_rate if s.warmup_steps else None, warmup_steps=s.warmup_steps, alpha=0.01)
    raise TrainError(f"--lr-schedule {s.lr_schedule}: choose constant or cosine")


class _Best(NamedTuple):
    """A figure an epoch can be the best on: its name in messages, its history.json key, +1 when
    lower is better (-1: higher), and the Trainer's checkpointed variable holding the best so far."""
    label: str
    key: str
    sign: int
    variable: str


_BEST_BY = {"loss": _Best("loss", "val_loss", 1, "best_val"), "cider": _Best("CIDEr", "val_CIDEr", -1, "best_cider")}


def _epoch_line(record: dict, epochs: int) -> str:
    """The epoch's line on stderr: losses, CIDEr, speed, and where its time went."""
    if record.get("stage") == "scst":
        line = (f"epoch {record['epoch']}/{epochs} (SCST): sample reward {record['train_reward']:.3f} (baseline "
                f"{record['train_baseline']:.3f}, {record['sample_length']:.1f} tokens a sample, scoring "
                f"{100 * record['reward_share']:.1f}% of the time)")
    else:
        line = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
                f"(cross-entropy {record['train_xent']:.4f})")
    if "val_loss" in record:
        line += f", val loss {record['val_loss']:.4f} (cross-entropy {record['val_xent']:.4f})"
    if "val_CIDEr" in record:
        line += f", val CIDEr {record['val_CIDEr']:.3f} (BLEU-4 {record['val_BLEU-4']:.3f})"
    line += f", {record['tokens_per_s']:,.0f} tokens/s; {record['epoch_seconds']:.1f} s training"
    if "val_seconds" in record:
        line += f", {record['val_seconds']:.1f} s val loss"
    if "eval_seconds" in record:
        line += f", {record['eval_seconds']:.1f} s caption metrics ({record['eval_images']} images)"
    return line


def _write_loss_plot(history: list[dict], path: str) -> None:
    """Loss per epoch, as the tutorial plots it, and the cross-entropy beside it
    (the attention regulariser gives the loss a floor of its own)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "loss per token"), (axes[1], "xent", "cross-entropy per token")):
        for split, label in (("train", "train"), ("val", "validation")):
            points = [(h["epoch"], h[f"{split}_{key}"]) for h in history if f"{split}_{key}" in h]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fileio.write_bytes(path, buf.getvalue())


class Trainer:
    def __init__(self, s: Settings):
        self.s = s
        # First: MultiWorkerMirroredStrategy must exist before any TensorFlow op runs.
        self.strategy = distribute.get_strategy(s.strategy)
        meta = metadata.read(s.data)
        self.meta = meta
        self.vocab = metadata.load_vocab(s.data, meta)
        self.feature_shape = meta.features.shape
        self.train_files = metadata.shard_files(s.data, "train", meta)
        data.check_shards(self.train_files, self.feature_shape)
        self.val_files = []
        if s.validate and "val" in meta.splits and meta.splits["val"].images.written:
            self.val_files = metadata.shard_files(s.data, "val", meta)
            data.check_shards(self.val_files, self.feature_shape)
        if not self.val_files and (s.early_stopping_metric != "loss" or s.export == "best"):
            asked = "--early-stopping-metric cider" if s.early_stopping_metric != "loss" else "--export best"
            raise TrainError(f"--data {s.data}: no val images, so no per-epoch validation for {asked} to follow")
        mean, std = metadata.load_feature_stats(s.data, meta)
        self.config = _resolve_config(s, len(self.vocab))

        keras.utils.set_random_seed(s.seed)
        self.chief = distribute.is_chief(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        if s.batch_size % replicas:
            raise TrainError(f"--batch-size {s.batch_size} does not split over {replicas} replicas")
        self.steps_per_epoch = math.ceil(meta.splits["train"].captions.written / s.batch_size)
        # An SCST step takes --batch-size images (with --scst-samples draws each), not captions.
        self.scst_steps_per_epoch = math.ceil(meta.splits["train"].images.written / s.batch_size)
        self.total_epochs = s.epochs + s.scst_epochs
        total = self.steps_per_epoch * s.epochs
        self.jit_compile = _resolve_jit(s.jit_compile, replicas)
        # XLA compiles once per batch shape: lengths padded up to fixed buckets keep that to a few.
        self.buckets = s.bucket_boundaries
        if self.jit_compile:
            self.buckets = data.jit_buckets(s.bucket_boundaries, meta.max_tokens)
        try:
            self.steps = CaptionSteps(self.config, mean, std, self.strategy, _learning_rate(s, total), s.clip_norm,
                                      jit_compile=self.jit_compile, attention_kernel=s.attention_kernel)
        except fused_attention.KernelError as e:
            raise TrainError(str(e)) from None
        self.model, self.optimizer = self.steps.model, self.steps.optimizer
        # Loop bookkeeping: plain host variables (outside the strategy's scope, so
        # they are not mirrored), saved in the checkpoint with the model.
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.best_val = tf.Variable(np.inf, dtype=tf.float64, trainable=False, name="best_val")
        # The best per-epoch val CIDEr (a job from before it existed restores without it: -inf).
        self.best_cider = tf.Variable(-np.inf, dtype=tf.float64, trainable=False, name="best_cider")
        # Epochs since the best on --early-stopping-metric.
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
        # The epoch's running loss, so a resumed epoch reports the same mean.
        self.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss_sum")
        self.epoch_xent_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_xent_sum")
        self.epoch_tokens = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_tokens")
        # The SCST stage: its steps (the global step is the cross-entropy optimizer's iterations plus
        # these), and its epoch's running reward, baseline, sample count and scoring time.
        self.scst_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="scst_steps")
        self.epoch_reward_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_reward_sum")
        self.epoch_baseline_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_baseline_sum")
        self.epoch_samples = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_samples")
        self.scst = self._scst_steps() if s.scst_epochs else None
        # Keras' dropout RNG states are not tracked by tf.train.Checkpoint: add them,
        # or a resumed run would draw different dropout masks.
        rng = [v.value for v in self.model.non_trainable_variables if "seed_generator" in v.path]
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, rng=rng, epoch=self.epoch,
            step_in_epoch=self.step_in_epoch, best_val=self.best_val, best_cider=self.best_cider,
            bad_epochs=self.bad_epochs,
            epoch_loss_sum=self.epoch_loss_sum, epoch_xent_sum=self.epoch_xent_sum, epoch_tokens=self.epoch_tokens,
            scst_steps=self.scst_steps, epoch_reward_sum=self.epoch_reward_sum,
            epoch_baseline_sum=self.epoch_baseline_sum, epoch_samples=self.epoch_samples,
            **({"scst_optimizer": self.scst.optimizer} if self.scst else {}))
        self.checkpoint_dir = fileio.join(s.job_dir, jobdir.CHECKPOINTS)
        home = s.job_dir
        if not self.chief:  # non-chief workers save too (collective ops), somewhere throwaway
            home = fileio.join(s.job_dir, "tmp", f"worker-{self.strategy.cluster_resolver.task_id}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, fileio.join(home, jobdir.CHECKPOINTS),
                                                  max_to_keep=s.keep_checkpoints)
        # The best epoch's checkpoint (on --early-stopping-metric), apart: the newest ones rotate
        # it out when a run later gets worse, and a run that goes bad must not take it with it.
        self.best_manager = tf.train.CheckpointManager(self.checkpoint, fileio.join(home, jobdir.BEST), max_to_keep=1)

    def _scst_steps(self):
        """The SCST step over this job's model, its reward scorer's document frequencies counted
        once over the training captions and cached in the job dir (keyed by the shards' sha256,
        so a restart reads neither the captions nor the features to find the cache valid)."""
        from caption_eval import cider_d
        from trainer import scst

        s, split = self.s, self.meta.splits["train"]
        digest = None
        if split.files:
            digest = hashlib.sha256(" ".join(f.sha256 for f in split.files).encode()).hexdigest()
        cache = fileio.join(s.job_dir, jobdir.CIDER_DF) if self.chief else None
        scorer = cider_d.build_scorer(cache, lambda: cider_d.read_references(self.train_files), digest=digest)
        return scst.ScstSteps(self.steps, scorer, max_length=self.meta.max_tokens - 1, samples=s.scst_samples,
                              baseline=s.scst_baseline, learning_rate=s.scst_learning_rate)

    def in_scst(self, epoch: int | None = None) -> bool:
        """Whether `epoch` (default: the current one) is of the SCST stage."""
        return (int(self.epoch) if epoch is None else epoch) >= self.s.epochs

    def epoch_steps(self, epoch: int) -> int:
        return self.scst_steps_per_epoch if self.in_scst(epoch) else self.steps_per_epoch

    # ------------------------------------------------------------------ data
    def _scst_dataset(self, epoch, skip=0):
        from trainer import scst

        s = self.s

        def fn(ctx):
            ds = scst.image_dataset(self.train_files, ctx.get_per_replica_batch_size(s.batch_size) if ctx else
                                    s.batch_size, feature_shape=self.feature_shape, seed=s.seed * 1000 + epoch,
                                    input_context=ctx)
            return ds.skip(skip) if skip else ds

        return self.strategy.distribute_datasets_from_function(fn)

    def _dataset(self, files, epoch, shuffle, skip=0):
        s = self.s

        def fn(ctx):
            ds = data.caption_dataset(
                files, ctx.get_per_replica_batch_size(s.batch_size) if ctx else s.batch_size,
                feature_shape=self.feature_shape, shuffle=shuffle, seed=s.seed * 1000 + epoch,
                shuffle_buffer=s.shuffle_buffer, bucket_boundaries=self.buckets, input_context=ctx,
                pad_to_bucket=self.jit_compile)
            return ds.skip(skip) if skip else ds

        return self.strategy.distribute_datasets_from_function(fn)

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
            while reason is None and int(self.epoch) < self.total_epochs:
                epoch = int(self.epoch)
                reason = self.train_epoch(actions)
                if reason is None or int(self.step_in_epoch) >= self.epoch_steps(epoch):  # its batches are all trained
                    record, val = self.end_epoch(actions)
                    for a in actions:
                        reason = a.end_epoch(self, record, val) or reason
                elif reason:  # stopped mid-epoch (--max-steps): keep the position for a later run
                    self.save(self.global_step())
        finally:
            for a in actions:
                a.close()
        return self._finish(reason or "epochs done", time.time() - start_time)

    def end_cross_entropy(self, reason: str) -> None:
        """End the cross-entropy stage before its --epochs (early stopping): the job goes on with
        SCST from here, and a restart does too (the position is saved)."""
        print(f"{reason}: the cross-entropy stage ends at epoch {int(self.epoch)}; SCST starts",
              file=sys.stderr)
        self.epoch.assign(self.s.epochs)
        self.bad_epochs.assign(0)
        self.save(self.global_step())

    def _start(self) -> str | None:
        """Restore (every worker, from the chief's checkpoints: the only real ones), record the
        job, and measure where the val loss starts. -> the restored checkpoint or None."""
        s = self.s
        restored = self._restore_newest_intact()
        if self.chief:
            fileio.write_text(fileio.join(s.job_dir, CONFIG_FILE), self.config.to_json())
            fileio.write_json(fileio.join(s.job_dir, jobdir.JOB_FILE),
                              jobdir.record_data(dict(s.to_dict(), job_dir=fileio.absolute(s.job_dir)),
                                                 s.data, s.job_dir))
        history_path = fileio.join(s.job_dir, jobdir.HISTORY_FILE)
        history = fileio.read_json(history_path) if restored and fileio.exists(history_path) else []
        # Epochs past the restored checkpoint (written before a save that did not happen, or kept by
        # a newer checkpoint that was damaged) are trained again: their records go, to come again.
        self.history = [h for h in history if h["epoch"] <= int(self.epoch)]
        if restored:
            print(f"resuming from {restored}: epoch {int(self.epoch) + 1}, step {self.global_step()}",
                  file=sys.stderr)
        initial_path = fileio.join(s.job_dir, jobdir.INITIAL_VAL_FILE)
        self.initial_val = None
        if not restored and self.val_files:
            # Where the loss starts: the yardstick for "learned" in metrics.json.
            self.initial_val = self.validate(0)
            if self.chief:
                fileio.write_json(initial_path, self.initial_val)
        elif restored and fileio.exists(initial_path):
            self.initial_val = fileio.read_json(initial_path)
        return restored

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
            found.append(actions_lib.EarlyStopping(s.early_stopping, _BEST_BY[s.early_stopping_metric].label))
        return found

    def train_epoch(self, actions) -> str | None:
        """Step through the rest of the current epoch, accumulating its loss. -> the reason
        an action stopped it early, or None when its batches ran out."""
        epoch, skip = int(self.epoch), int(self.step_in_epoch)
        scst = self.in_scst(epoch)
        if scst:  # self.scst exists: total_epochs counts SCST epochs only with --scst-epochs
            ds = self._scst_dataset(epoch, skip)
            if self.scst.train_step is None:
                self.scst.build(ds.element_spec, self.s.batch_size // self.strategy.num_replicas_in_sync)
        else:
            ds = self._dataset(self.train_files, epoch, shuffle=True, skip=skip)
            if self.steps.train_step is None:
                self.steps.build(ds.element_spec)
        for a in actions:
            a.start_epoch(self, epoch, skip)
        self._epoch_start, self._epoch_tokens_this_run, self._epoch_reward_seconds = time.time(), 0, 0.0
        reason = None
        for batch in ds:
            began = time.time()
            out = self._scst_step(batch) if scst else self.steps.train_step(batch)
            step = self.global_step()
            self._stop_if_not_finite(out, step)
            self.step_in_epoch.assign_add(1)
            n = int(out["tokens"])
            self.epoch_loss_sum.assign_add(float(out["loss"]) * n)
            if not scst:
                self.epoch_xent_sum.assign_add(float(out["xent"]) * n)
            self.epoch_tokens.assign_add(n)
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

    def _scst_step(self, batch) -> dict:
        """One SCST step, its draws seeded by (--seed, SCST step): a resumed run draws what an
        uninterrupted one would have. Its reward and baseline (means per sample) go into the epoch's sums."""
        from trainer import scst

        out = self.scst.train_step(batch, scst.step_seed(self.s.seed, int(self.scst_steps)))
        self.scst_steps.assign_add(1)
        samples = int(out["samples"])
        self.epoch_reward_sum.assign_add(float(out["reward"]) * samples)
        self.epoch_baseline_sum.assign_add(float(out["baseline"]) * samples)
        self.epoch_samples.assign_add(samples)
        self._epoch_reward_seconds += float(out["reward_seconds"])
        return out

    def end_epoch(self, actions=()) -> tuple[dict, dict | None]:
        """Validate, add the actions' figures (the caption metrics), record the epoch in history.json,
        move the position to the next epoch and save it (and checkpoints/best when the epoch is the
        best so far on --early-stopping-metric). -> (the history record, val)."""
        s, epoch, tokens, seconds = self.s, int(self.epoch), max(int(self.epoch_tokens), 1), self._epoch_seconds
        record = {"epoch": epoch + 1, "step": self.global_step()}
        if self.in_scst(epoch):
            n = max(int(self.epoch_samples), 1)
            # loss: the surrogate (advantage-weighted NLL per sampled token); tokens: sampled ones.
            record.update(stage="scst", scst_loss=float(self.epoch_loss_sum) / tokens,
                          train_reward=float(self.epoch_reward_sum) / n,
                          train_baseline=float(self.epoch_baseline_sum) / n,
                          sample_length=tokens / n, reward_share=self._epoch_reward_seconds / max(seconds, 1e-9))
        else:
            record.update(train_loss=float(self.epoch_loss_sum) / tokens,
                          train_xent=float(self.epoch_xent_sum) / tokens)
        record.update(tokens_per_s=self._epoch_tokens_this_run / max(seconds, 1e-9), epoch_seconds=seconds)
        start = time.time()
        val = self.validate(epoch)
        if val:
            record.update(val_loss=val["loss"], val_xent=val["xent"], val_reg=val["reg"],
                          val_seconds=time.time() - start)
        for a in actions:
            record.update(a.epoch_figures(self, epoch))
        print(_epoch_line(record, self.total_epochs), file=sys.stderr)
        improved = self._track_best(record)
        self.history.append(record)
        # history.json before the checkpoint: a job stopped between the two has a record that its
        # checkpoint lacks, which the restart drops and writes again; the other order would lose it.
        if self.chief:
            fileio.write_json(fileio.join(s.job_dir, jobdir.HISTORY_FILE), self.history)
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        self.epoch_loss_sum.assign(0.0)
        self.epoch_xent_sum.assign(0.0)
        self.epoch_tokens.assign(0)
        self.epoch_reward_sum.assign(0.0)
        self.epoch_baseline_sum.assign(0.0)
        self.epoch_samples.assign(0)
        self.save(self.global_step())
        if improved:
            self.save(self.global_step(), best=True)
        return record, val

    def _track_best(self, record: dict) -> bool:
        """Keep the best val loss and val CIDEr so far (in the checkpoint) and count the epochs since
        the best on --early-stopping-metric. -> whether this epoch is that best. An epoch without the
        figure (validation off) counts neither way."""
        better = {}
        for metric, b in _BEST_BY.items():
            best, value = getattr(self, b.variable), record.get(b.key)
            better[metric] = value is not None and b.sign * value < b.sign * float(best)
            if better[metric]:
                best.assign(value)
        metric = self.s.early_stopping_metric
        if better[metric]:
            self.bad_epochs.assign(0)
        elif record.get(_BEST_BY[metric].key) is not None:
            self.bad_epochs.assign_add(1)
        return better[metric]

    def _finish(self, reason: str, seconds: float) -> dict:
        metrics = self._final_metrics(self.history, self.trained_tokens, seconds, reason)
        if self.chief:
            fileio.write_json(fileio.join(self.s.job_dir, jobdir.METRICS_FILE), metrics)
            if self.history:
                _write_loss_plot(self.history, fileio.join(self.s.job_dir, jobdir.LOSS_PLOT))
            self.save_weights()
        return metrics

    def global_step(self) -> int:
        """Steps of both stages: cross-entropy (the optimizer's iterations) and SCST."""
        # iterations is a mirrored variable under a strategy: read it as a tensor.
        return int(tf.convert_to_tensor(self.optimizer.iterations.value)) + int(self.scst_steps)

    def current_lr(self):
        optimizer = self.scst.optimizer if self.scst is not None and self.in_scst() else self.optimizer
        lr = optimizer.learning_rate
        return lr(optimizer.iterations) if callable(lr) else lr

    def _final_metrics(self, history, tokens, seconds, reason):
        last = history[-1] if history else {}
        xent = [h for h in history if "train_loss" in h]
        return {"steps": self.global_step(), "epochs_completed": int(self.epoch),
                "final_train_loss": xent[-1]["train_loss"] if xent else None, "final_val_loss": last.get("val_loss"),
                "final_train_reward": last.get("train_reward"), "scst_steps": int(self.scst_steps),
                "best_val_loss": None if math.isinf(float(self.best_val)) else float(self.best_val),
                "best_val_cider": None if math.isinf(float(self.best_cider)) else float(self.best_cider),
                "early_stopping_metric": self.s.early_stopping_metric,
                "initial_val_loss": (self.initial_val or {}).get("loss"),
                "initial_val_xent": (self.initial_val or {}).get("xent"),
                "stopped": reason, "wall_seconds": round(seconds, 2),
                "tokens_per_s_this_run": round(tokens / max(seconds, 1e-9), 1),
                "replicas": self.strategy.num_replicas_in_sync,
                "attention_kernel": "fused" if self.steps.fused_attention else "ops",
                "attention_kernel_build": fused_attention.loaded_build() if self.steps.fused_attention else None,
                "jit_compile": self.jit_compile, "history": history}

    def save_weights(self) -> str:
        """The trained weights and what rebuilds them, for export."""
        path = fileio.join(self.s.job_dir, jobdir.FINAL, "model.weights.h5")
        fileio.write_through_local(path, self.model.save_weights)
        fileio.write_text(fileio.join(self.s.job_dir, jobdir.FINAL, CONFIG_FILE), self.config.to_json())
        return path


def train(s: Settings) -> dict:
    return Trainer(s).run()
