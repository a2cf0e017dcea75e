"""Checkpoints that are whole or absent, and the newest whole one found again.

What TensorFlow guarantees, and what this module adds:
- tf.train.Checkpoint writes a checkpoint's data into PREFIX_temp/ and its .index to a
  temporary name, renaming each into place when it is complete; CheckpointManager then
  rewrites its "checkpoint" list (atomically: temporary file and rename) only after the
  save returned. On gs:// an object appears only when its upload is complete. So a save
  that fails part-way (a full disk) leaves no listed checkpoint half-written.
- What such a save does leave (PREFIX_temp/, a data file renamed before the index
  failed) is removed here, and the failure becomes one fileio.WriteError naming PREFIX.
- A listed checkpoint can still be damaged afterwards (cut short by a partial copy):
  restore_newest_intact tries the newest first and falls back, saying which and why.
"""
from __future__ import annotations

import os

import tensorflow as tf

from caption_io import fileio


def prefix(manager: tf.train.CheckpointManager, step: int) -> str:
    """The path of the checkpoint `manager` writes for `step` (CheckpointManager's naming)."""
    return f"{manager.directory.rstrip('/')}/ckpt-{step}"


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """manager.save at `step`; a refused write leaves nothing new behind and raises WriteError."""
    path = prefix(manager, step)
    listed = set(manager.checkpoints)
    try:
        with fileio.writing(path):
            return manager.save(checkpoint_number=step)
    except fileio.WriteError:
        if path not in listed:  # a listed one of the same step was whole before: leave it to restore's check
            for leftover in tf.io.gfile.glob(f"{path}.*") + tf.io.gfile.glob(f"{path}_temp"):
                try:
                    if tf.io.gfile.isdir(leftover):
                        tf.io.gfile.rmtree(leftover)
                    else:
                        tf.io.gfile.remove(leftover)
                except tf.errors.OpError:
                    pass  # the error being raised says what matters
        raise


def listed(directory: str) -> list[str]:
    """The checkpoints a directory's "checkpoint" file lists, oldest first."""
    state = tf.train.get_checkpoint_state(directory)
    return list(state.all_model_checkpoint_paths) if state else []


def restore_newest_intact(directory: str, restore) -> tuple[str | None, list[str]]:
    """Call restore(path) on the newest listed checkpoint that reads back whole.
    -> (its path or None when none is listed or none is whole, ["ckpt-N (why)", ...] for
    each newer one that failed)."""
    damaged = []
    for path in reversed(listed(directory)):
        try:
            restore(path)
        except Exception as e:
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            damaged.append(f"{os.path.basename(path)} ({type(e).__name__}: {why})")
            continue
        return path, damaged
    return None, damaged
