"""What a job is built from, before its first step: the data it reads, the settings resolved for
this machine (XLA, the step's precision, the learning-rate schedule, the model config a resumed job
must keep), the steps of both stages (the SCST step with its reward scorer) and the checkpoint that
holds them.

Each is a function of the settings and what came before it; trainer/loop.py calls them in order
and runs what they build.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import NamedTuple

import keras
import tensorflow as tf

from caption_io import fileio, geometry, jobdir, metadata
from caption_io.jobdir import CONFIG_FILE
from model import CaptionerConfig, fused_attention
from model.precision import Choice
from trainer import data, distribute, precision
from trainer.errors import TrainError
from trainer.settings import JIT_CHOICES, Settings
from trainer.steps import CaptionSteps

log = logging.getLogger(__name__)


def model_config(s: Settings, vocab_size: int, features: geometry.Geometry = geometry.DEFAULT,
                 compute_dtype: str = precision.FLOAT32) -> CaptionerConfig:
    """The model the settings ask for, over `features` (the data's geometry: its grid, flattened,
    and channels), computing in `compute_dtype` (--precision, resolved)."""
    return CaptionerConfig(vocab_size=vocab_size, embedding_dim=s.embedding_dim, units=s.units,
                           num_positions=features.positions, feature_dim=features.channels,
                           decoder=s.decoder, layers=s.layers, heads=s.heads, ff_units=s.ff_units,
                           dropout=s.dropout, word_dropout=s.word_dropout, attention_reg=s.attention_reg, gate=s.gate,
                           compute_dtype=compute_dtype)


def resolve_jit(choice: str, replicas: int) -> bool:
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


def resolve_config(s: Settings, meta, vocab_size: int, choose_precision) -> tuple[CaptionerConfig, Choice]:
    """The config of a new job, or the saved one of a job being resumed (which must agree with the
    data and the flags), and the step's precision: choose_precision(the resumed job's compute dtype
    or None, the config in float32) -> Choice (train_precision below)."""
    path = fileio.join(s.job_dir, CONFIG_FILE)
    saved = CaptionerConfig.from_json(fileio.read_text(path)) if fileio.exists(path) else None
    if saved is not None:
        metadata.check_encoder(jobdir.recorded_encoder(s.job_dir), meta, f"--job-dir {s.job_dir}", f"--data {s.data}")
    choice = choose_precision(saved.compute_dtype if saved else None, model_config(s, vocab_size, meta.geometry))
    wanted = model_config(s, vocab_size, meta.geometry, choice.precision)
    if saved is None:
        return wanted, choice
    if (saved.num_positions, saved.feature_dim) != (wanted.num_positions, wanted.feature_dim):
        raise TrainError(f"--job-dir {s.job_dir}: trained on features of {saved.num_positions} positions x "
                         f"{saved.feature_dim} channels, and --data {s.data} holds {meta.geometry.describe()} "
                         f"({meta.encoder.name}): use the data it trained on, or a new --job-dir")
    if saved.vocab_size != vocab_size:
        raise TrainError(f"--job-dir {s.job_dir}: its checkpoint has vocab size {saved.vocab_size} "
                         f"but --data {s.data} has {vocab_size}; use a new --job-dir")
    diff = {k: (v, getattr(wanted, k)) for k, v in saved.to_dict().items() if getattr(wanted, k) != v}
    if diff:
        k, (old, new) = next(iter(diff.items()))
        raise TrainError(f"--job-dir {s.job_dir}: the job was started with {k}={old}, now {k}={new}; "
                         "resume with the same flags or use a new --job-dir")
    return saved, choice


def train_precision(s: Settings, meta, strategy, mean, std, train_files: list[str]):
    """resolve_config's choose_precision for this job on this machine: trainer/precision.py's
    choice, auto timing the job's own step on its first batch where the matmul probe passes."""
    def choose(resumed, config: CaptionerConfig) -> Choice:
        def step_speedup() -> float:
            batch = next(iter(data.caption_dataset(train_files, s.batch_size // strategy.num_replicas_in_sync,
                                                   feature_shape=meta.features.shape, shuffle=False)))
            jit = resolve_jit(s.jit_compile, strategy.num_replicas_in_sync)
            seconds = precision.time_steps(
                lambda dtype: CaptionSteps(dataclasses.replace(config, compute_dtype=dtype), mean, std, strategy,
                                           s.learning_rate, s.clip_norm, jit_compile=jit,
                                           attention_kernel=s.attention_kernel), batch)
            return seconds[precision.FLOAT32] / seconds[precision.BFLOAT16]

        try:
            choice = precision.choose(s.precision, resumed=resumed, workers=distribute.workers(strategy),
                                      step_speedup=step_speedup)
        except fused_attention.KernelError as e:
            raise TrainError(str(e)) from None
        log.info("train step precision: %s", choice.describe())
        return choice
    return choose


def learning_rate(s: Settings, total_steps: int):
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


def shard_files(s: Settings, meta) -> tuple[list[str], list[str]]:
    """The train shards and the val shards (none with --no-validate or no val images), their sizes
    checked against metadata.json; refused when a setting needs validation that cannot happen."""
    train_files = metadata.shard_files(s.data, "train", meta)
    data.check_shards(train_files, meta.features.shape)
    val_files = []
    if s.validate and "val" in meta.splits and meta.splits["val"].images.written:
        val_files = metadata.shard_files(s.data, "val", meta)
        data.check_shards(val_files, meta.features.shape)
    if not val_files and (s.early_stopping_metric != "loss" or s.export == "best"):
        asked = "--early-stopping-metric cider" if s.early_stopping_metric != "loss" else "--export best"
        raise TrainError(f"--data {s.data}: no val images, so no per-epoch validation for {asked} to follow")
    return train_files, val_files


class Plan(NamedTuple):
    """The job's epochs on this machine: steps in an epoch of each stage, epochs in all, whether
    the step is compiled by XLA, and the caption-length buckets of its batches."""
    steps_per_epoch: int
    scst_steps_per_epoch: int
    total_epochs: int
    jit_compile: bool
    buckets: tuple


def plan(s: Settings, meta, replicas: int) -> Plan:
    if s.batch_size % replicas:
        raise TrainError(f"--batch-size {s.batch_size} does not split over {replicas} replicas")
    jit_compile = resolve_jit(s.jit_compile, replicas)
    return Plan(steps_per_epoch=math.ceil(meta.splits["train"].captions.written / s.batch_size),
                # An SCST step takes --batch-size images (with --scst-samples draws each), not captions.
                scst_steps_per_epoch=math.ceil(meta.splits["train"].images.written / s.batch_size),
                total_epochs=s.epochs + s.scst_epochs, jit_compile=jit_compile,
                # XLA compiles once per batch shape: lengths padded up to fixed buckets keep that to a few.
                buckets=data.jit_buckets(s.bucket_boundaries, meta.max_tokens) if jit_compile else s.bucket_boundaries)


def caption_steps(s: Settings, config: CaptionerConfig, mean, std, strategy, plan: Plan) -> CaptionSteps:
    """The cross-entropy steps (model and optimizer), the learning rate over --epochs of them."""
    try:
        return CaptionSteps(config, mean, std, strategy, learning_rate(s, plan.steps_per_epoch * s.epochs),
                            s.clip_norm, jit_compile=plan.jit_compile, attention_kernel=s.attention_kernel)
    except fused_attention.KernelError as e:
        raise TrainError(str(e)) from None


def scst_steps(s: Settings, meta, steps: CaptionSteps, train_files: list[str], chief: bool):
    """The SCST step over this job's model, its reward scorer's document frequencies counted
    once over the training captions and cached in the job dir (keyed by the shards' sha256,
    so a restart reads neither the captions nor the features to find the cache valid)."""
    from caption_eval import cider_d
    from trainer import scst

    split = meta.splits["train"]
    digest = None
    if split.files:
        digest = hashlib.sha256(" ".join(f.sha256 for f in split.files).encode()).hexdigest()
    cache = fileio.join(s.job_dir, jobdir.CIDER_DF) if chief else None
    scorer = cider_d.build_scorer(cache, lambda: cider_d.read_references(train_files), digest=digest)
    return scst.ScstSteps(steps, scorer, max_length=meta.max_tokens - 1, samples=s.scst_samples,
                          baseline=s.scst_baseline, learning_rate=s.scst_learning_rate,
                          xent_weight=s.scst_xent_weight)


def checkpoint(model, optimizer, counters: dict, scst_optimizer=None) -> tf.train.Checkpoint:
    """The model, the optimizer(s), the dropout RNG state and the loop's counters, each under the
    key it has had since the first jobs (the counters' keys are their names)."""
    # Keras' dropout RNG states are not tracked by tf.train.Checkpoint: add them,
    # or a resumed run would draw different dropout masks.
    rng = [v.value for v in model.non_trainable_variables if "seed_generator" in v.path]
    return tf.train.Checkpoint(model=model, optimizer=optimizer, rng=rng, **counters,
                               **({"scst_optimizer": scst_optimizer} if scst_optimizer is not None else {}))


def managers(s: Settings, ckpt: tf.train.Checkpoint, chief: bool, strategy):
    """-> (the newest checkpoints' manager, checkpoints/best's manager). Non-chief workers save
    too (collective ops), somewhere throwaway."""
    home = s.job_dir
    if not chief:
        home = fileio.join(s.job_dir, "tmp", f"worker-{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(ckpt, fileio.join(home, jobdir.CHECKPOINTS), max_to_keep=s.keep_checkpoints)
    # The best epoch's checkpoint (on --early-stopping-metric), apart: the newest ones rotate
    # it out when a run later gets worse, and a run that goes bad must not take it with it.
    best = tf.train.CheckpointManager(ckpt, fileio.join(home, jobdir.BEST), max_to_keep=1)
    return manager, best

