"""The training loop: strategy, compiled step, checkpoints, summaries, resume.

The model, loss and inputs are single-replica code (model/, trainer/data.py);
this module runs them on whatever tf.distribute strategy the machine calls for.

Resuming: the checkpoint holds the model, the optimizer (and so the step),
the dropout RNG state, the epoch and the number of batches already trained in
it. Each epoch's data order is fixed by (seed, epoch), so a restarted run skips
exactly the batches it had trained on and continues with the same ones an
uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from model import CaptionerConfig, fused_attention
from caption_io import fileio

from caption_io import checkpoints, jobdir
from trainer import data, distribute
from caption_io.jobdir import CONFIG_FILE
from trainer.steps import CaptionSteps


class TrainError(ValueError):
    """A job that cannot start (one readable line, before any training)."""


@dataclasses.dataclass
class Settings:
    data: str
    job_dir: str
    epochs: int = 10
    batch_size: int = 64                   # global, over all replicas
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"          # constant | cosine
    warmup_steps: int = 0
    clip_norm: float = 5.0
    embedding_dim: int = 256
    units: int = 512
    dropout: float = 0.1
    attention_reg: float = 1.0
    gate: bool = False
    mixed_precision: bool = False          # bfloat16 compute, float32 variables and logits
    attention_kernel: str = "auto"         # auto | fused | ops (model/fused_attention.py)
    jit_compile: str = "auto"              # auto | on | off: XLA for the train step (auto: on one GPU)
    strategy: str = "auto"
    seed: int = 0
    shuffle_buffer: int = 1024
    bucket_boundaries: tuple = ()
    checkpoint_every: int = 500            # steps; and at every epoch end
    keep_checkpoints: int = 3
    early_stopping: int = 0                # epochs without val improvement; 0 = off
    max_steps: int = 0                     # stop after this many steps in all; 0 = no limit
    validate: bool = True
    export: bool = True                    # write the SavedModel at the end (trainer.task)
    evaluate: bool = True                  # and score it on val with the COCO metrics
    progress: bool | None = None           # None: a bar when stderr is a terminal


class _Sigterm:
    """Turns SIGTERM (preemptible machines send it) into a flag the loop checks."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, *_):
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Interrupted(Exception):
    """Training stopped by SIGTERM after saving a checkpoint."""


def model_config(s: Settings, vocab_size: int) -> CaptionerConfig:
    return CaptionerConfig(vocab_size=vocab_size, embedding_dim=s.embedding_dim, units=s.units,
                           dropout=s.dropout, attention_reg=s.attention_reg, gate=s.gate,
                           compute_dtype="bfloat16" if s.mixed_precision else "float32")


JIT_CHOICES = ("auto", "on", "off")


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


def _max_tokens(meta: dict) -> int:
    return max(int(info.get("max_tokens", 0)) for info in meta["splits"].values())


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
        meta = data.load_metadata(s.data)
        self.meta = meta
        self.vocab = data.load_vocab(s.data, meta)
        self.feature_shape = tuple(meta["features"]["shape"])
        self.train_files = data.shard_files(s.data, "train", meta)
        data.check_shards(self.train_files, self.feature_shape)
        self.val_files = []
        if s.validate and "val" in meta["splits"] and meta["splits"]["val"]["images"]["written"]:
            self.val_files = data.shard_files(s.data, "val", meta)
            data.check_shards(self.val_files, self.feature_shape)
        mean, std = data.load_feature_stats(s.data, meta)
        self.config = _resolve_config(s, len(self.vocab))

        keras.utils.set_random_seed(s.seed)
        self.chief = distribute.is_chief(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        if s.batch_size % replicas:
            raise TrainError(f"--batch-size {s.batch_size} does not split over {replicas} replicas")
        self.steps_per_epoch = math.ceil(data.count_captions(meta, "train") / s.batch_size)
        total = self.steps_per_epoch * s.epochs
        self.jit_compile = _resolve_jit(s.jit_compile, replicas)
        # XLA compiles once per batch shape: lengths padded up to fixed buckets keep that to a few.
        self.buckets = s.bucket_boundaries
        if self.jit_compile:
            self.buckets = data.jit_buckets(s.bucket_boundaries, _max_tokens(meta))
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
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
        # The epoch's running loss, so a resumed epoch reports the same mean.
        self.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss_sum")
        self.epoch_xent_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_xent_sum")
        self.epoch_tokens = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_tokens")
        # Keras' dropout RNG states are not tracked by tf.train.Checkpoint: add them,
        # or a resumed run would draw different dropout masks.
        rng = [v.value for v in self.model.non_trainable_variables if "seed_generator" in v.path]
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, rng=rng, epoch=self.epoch,
            step_in_epoch=self.step_in_epoch, best_val=self.best_val, bad_epochs=self.bad_epochs,
            epoch_loss_sum=self.epoch_loss_sum, epoch_xent_sum=self.epoch_xent_sum, epoch_tokens=self.epoch_tokens)
        self.checkpoint_dir = fileio.join(s.job_dir, jobdir.CHECKPOINTS)
        home = s.job_dir
        if not self.chief:  # non-chief workers save too (collective ops), somewhere throwaway
            home = fileio.join(s.job_dir, "tmp", f"worker-{self.strategy.cluster_resolver.task_id}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, fileio.join(home, jobdir.CHECKPOINTS),
                                                  max_to_keep=s.keep_checkpoints)
        # The best validation loss's checkpoint, apart: the newest ones rotate it out when
        # a run later gets worse, and a run that goes bad must not take it with it.
        self.best_manager = tf.train.CheckpointManager(self.checkpoint, fileio.join(home, jobdir.BEST), max_to_keep=1)

    # ------------------------------------------------------------------ data
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
        for batch in self._dataset(self.val_files, epoch, shuffle=False):
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
        raise TrainError(f"step {step}: loss {loss}, gradient norm {norm}: stopped before saving this state "
                         f"({kept}). Likely causes: a learning rate too high for this model (--learning-rate "
                         f"{self.s.learning_rate}: lower it and run the command again to go on from the checkpoint), "
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

    def _save(self, step: int, best: bool = False) -> str:
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
        s = self.s
        # Every worker restores from the chief's checkpoints (the only real ones).
        restored = self._restore_newest_intact()
        if self.chief:
            fileio.write_text(fileio.join(s.job_dir, CONFIG_FILE), self.config.to_json())
            fileio.write_json(fileio.join(s.job_dir, jobdir.JOB_FILE),
                              jobdir.record_data(dict(settings_dict(s), job_dir=fileio.absolute(s.job_dir)),
                                                 s.data, s.job_dir))
        history_path = fileio.join(s.job_dir, jobdir.HISTORY_FILE)
        history = fileio.read_json(history_path) if restored and fileio.exists(history_path) else []
        writers = {}
        if self.chief:
            writers = {k: tf.summary.create_file_writer(fileio.join(s.job_dir, jobdir.LOGS, k)) for k in ("train", "val")}
        progress = sys.stderr.isatty() if s.progress is None else s.progress
        start_time = time.time()
        trained_tokens, stop_reason = 0, "epochs done"
        if restored:
            print(f"resuming from {restored}: epoch {int(self.epoch) + 1}, step {self.global_step()}",
                  file=sys.stderr)

        initial_val = None
        if not restored and self.val_files:
            # Where the loss starts: the yardstick for "learned" in metrics.json.
            self.steps.build(self._dataset(self.val_files, 0, shuffle=False).element_spec)
            initial_val = self.validate(0)
            if self.chief:
                fileio.write_json(fileio.join(s.job_dir, jobdir.INITIAL_VAL_FILE), initial_val)
        elif restored and fileio.exists(fileio.join(s.job_dir, jobdir.INITIAL_VAL_FILE)):
            initial_val = fileio.read_json(fileio.join(s.job_dir, jobdir.INITIAL_VAL_FILE))
        self.initial_val = initial_val

        with _Sigterm() as sigterm:
            while int(self.epoch) < s.epochs:
                epoch = int(self.epoch)
                skip = int(self.step_in_epoch)
                ds = self._dataset(self.train_files, epoch, shuffle=True, skip=skip)
                if self.steps.train_step is None:
                    self.steps.build(ds.element_spec)
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{s.epochs}",
                               unit="step", file=sys.stderr, dynamic_ncols=True)
                t_epoch, tokens_this_run = time.time(), 0
                for batch in ds:
                    out = self.steps.train_step(batch)
                    step = self.global_step()
                    self._stop_if_not_finite(out, step)
                    self.step_in_epoch.assign_add(1)
                    n = int(out["tokens"])
                    self.epoch_loss_sum.assign_add(float(out["loss"]) * n)
                    self.epoch_xent_sum.assign_add(float(out["xent"]) * n)
                    self.epoch_tokens.assign_add(n)
                    tokens_this_run += n
                    trained_tokens += n
                    rate = tokens_this_run / max(time.time() - t_epoch, 1e-9)
                    if writers and step % 10 == 0:
                        with writers["train"].as_default(step=step):
                            for k in ("loss", "xent", "reg", "grad_norm"):
                                tf.summary.scalar(k, out[k])
                            tf.summary.scalar("learning_rate", self._current_lr())
                            tf.summary.scalar("tokens_per_s", rate)
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(out['loss']):.3f}", tok_s=f"{rate:,.0f}")
                    if s.checkpoint_every and step % s.checkpoint_every == 0:
                        self._save(step)
                    if sigterm.received:
                        path = self._save(step)
                        if bar:
                            bar.close()
                        raise Interrupted(f"stopped by SIGTERM at step {step}; saved {path}; "
                                          "run the same command to continue")
                    if s.max_steps and step >= s.max_steps:
                        break
                if bar:
                    bar.close()
                if s.max_steps and self.global_step() >= s.max_steps and \
                        int(self.step_in_epoch) < self.steps_per_epoch:
                    # Stopped mid-epoch by --max-steps: keep the position for a later run.
                    self._save(self.global_step())
                    stop_reason = "max steps"
                    break
                record = {"epoch": epoch + 1, "step": self.global_step(),
                          "train_loss": float(self.epoch_loss_sum) / max(int(self.epoch_tokens), 1),
                          "train_xent": float(self.epoch_xent_sum) / max(int(self.epoch_tokens), 1),
                          "tokens_per_s": tokens_this_run / max(time.time() - t_epoch, 1e-9)}
                val = self.validate(epoch)
                if val:
                    record.update(val_loss=val["loss"], val_xent=val["xent"])
                    if writers:
                        with writers["val"].as_default(step=self.global_step()):
                            for k, v in val.items():
                                tf.summary.scalar(k, v)
                history.append(record)
                line = (f"epoch {epoch + 1}/{s.epochs}: train loss {record['train_loss']:.4f} "
                        f"(cross-entropy {record['train_xent']:.4f})")
                if val:
                    line += f", val loss {val['loss']:.4f} (cross-entropy {val['xent']:.4f})"
                print(line + f", {record['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
                self.epoch.assign_add(1)
                self.step_in_epoch.assign(0)
                self.epoch_loss_sum.assign(0.0)
                self.epoch_xent_sum.assign(0.0)
                self.epoch_tokens.assign(0)
                stop = improved = False
                if val:
                    improved = val["loss"] < float(self.best_val)
                    if improved:
                        self.best_val.assign(val["loss"])
                        self.bad_epochs.assign(0)
                    else:
                        self.bad_epochs.assign_add(1)
                        stop = bool(s.early_stopping) and int(self.bad_epochs) >= s.early_stopping
                self._save(self.global_step())
                if improved:
                    self._save(self.global_step(), best=True)
                if self.chief:
                    fileio.write_json(history_path, history)
                if stop:
                    stop_reason = f"early stopping: no val improvement in {s.early_stopping} epochs"
                    break
        for w in writers.values():
            w.flush()
        metrics = self._final_metrics(history, trained_tokens, time.time() - start_time, stop_reason)
        if self.chief:
            fileio.write_json(fileio.join(s.job_dir, jobdir.METRICS_FILE), metrics)
            if history:
                _write_loss_plot(history, fileio.join(s.job_dir, jobdir.LOSS_PLOT))
            self.save_weights()
        return metrics

    def global_step(self) -> int:
        # iterations is a mirrored variable under a strategy: read it as a tensor.
        return int(tf.convert_to_tensor(self.optimizer.iterations.value))

    def _current_lr(self):
        lr = self.optimizer.learning_rate
        return lr(self.optimizer.iterations) if callable(lr) else lr

    def _final_metrics(self, history, tokens, seconds, reason):
        last = history[-1] if history else {}
        return {"steps": self.global_step(), "epochs_completed": int(self.epoch),
                "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
                "best_val_loss": None if math.isinf(float(self.best_val)) else float(self.best_val),
                "initial_val_loss": (self.initial_val or {}).get("loss"),
                "initial_val_xent": (self.initial_val or {}).get("xent"),
                "stopped": reason, "wall_seconds": round(seconds, 2),
                "tokens_per_s_this_run": round(tokens / max(seconds, 1e-9), 1),
                "replicas": self.strategy.num_replicas_in_sync,
                "attention_kernel": "fused" if self.steps.fused_attention else "ops",
                "jit_compile": self.jit_compile, "history": history}

    def save_weights(self) -> str:
        """The trained weights and what rebuilds them, for export."""
        path = fileio.join(self.s.job_dir, jobdir.FINAL, "model.weights.h5")
        fileio.write_through_local(path, self.model.save_weights)
        fileio.write_text(fileio.join(self.s.job_dir, jobdir.FINAL, CONFIG_FILE), self.config.to_json())
        return path


def train(s: Settings) -> dict:
    return Trainer(s).run()


def settings_dict(s: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(s)))
