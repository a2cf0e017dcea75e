"""The loop's position and its epoch's running sums: one object, in the checkpoint.

Each counter is declared once, in `LoopState.COUNTERS`: the object creates it as a host
tf.Variable (outside the strategy's scope, so it is not mirrored), lists it for the checkpoint
under its name (a checkpoint key since the first jobs: renaming one would leave old checkpoints
unreadable), and `next_epoch` resets the epoch's sums. A resumed epoch therefore reports the
mean an uninterrupted one would have.

The best figures so far and the epochs since the best are kept by trainer/best.py, which
declares its own counters the same way.
"""
from __future__ import annotations

import tensorflow as tf

# (name, dtype, value at the start of a job): the position, then the epoch's sums (reset each epoch).
POSITION = (
    ("epoch", tf.int64, 0),
    ("step_in_epoch", tf.int64, 0),
    # The SCST stage's steps: the global step is the cross-entropy optimizer's iterations plus these.
    ("scst_steps", tf.int64, 0),
)
EPOCH_SUMS = (
    # The epoch's running loss and cross-entropy (each step's mean times its tokens), and tokens. In SCST
    # the tokens are the sampled ones and the cross-entropy is the reference captions' term.
    ("epoch_loss_sum", tf.float64, 0.0),
    ("epoch_xent_sum", tf.float64, 0.0),
    ("epoch_tokens", tf.int64, 0),
    # An SCST epoch's running reward and baseline (each step's mean per sample times its samples), and samples.
    ("epoch_reward_sum", tf.float64, 0.0),
    ("epoch_baseline_sum", tf.float64, 0.0),
    ("epoch_samples", tf.int64, 0),
)


def variables(declared) -> dict[str, tf.Variable]:
    """A host tf.Variable per (name, dtype, initial value), by name."""
    return {name: tf.Variable(initial, dtype=dtype, trainable=False, name=name) for name, dtype, initial in declared}


class LoopState:
    """Where the job is (epoch, batches trained in it, SCST steps) and the epoch's sums.
    Each counter is an attribute of its name (a tf.Variable)."""

    COUNTERS = POSITION + EPOCH_SUMS

    def __init__(self):
        self._variables = variables(self.COUNTERS)
        for name, variable in self._variables.items():
            setattr(self, name, variable)

    def checkpointed(self) -> dict[str, tf.Variable]:
        """The counters by checkpoint key (the key is the name)."""
        return dict(self._variables)

    def add_step(self, out: dict) -> int:
        """A trained batch of either stage into the position and the epoch's sums (an SCST step's
        xent is 0 without --scst-xent-weight). -> its tokens."""
        self.step_in_epoch.assign_add(1)
        n = int(out["tokens"])
        self.epoch_loss_sum.assign_add(float(out["loss"]) * n)
        self.epoch_xent_sum.assign_add(float(out["xent"]) * n)
        self.epoch_tokens.assign_add(n)
        return n

    def add_scst_step(self, out: dict) -> None:
        """An SCST step's count, and its reward and baseline (means per sample), into the sums."""
        self.scst_steps.assign_add(1)
        samples = int(out["samples"])
        self.epoch_reward_sum.assign_add(float(out["reward"]) * samples)
        self.epoch_baseline_sum.assign_add(float(out["baseline"]) * samples)
        self.epoch_samples.assign_add(samples)

    def train_figures(self, scst: bool, seconds: float, reward_seconds: float) -> dict:
        """The epoch's means for its history.json record (keys in the record's order)."""
        tokens = max(int(self.epoch_tokens), 1)
        if not scst:
            return {"train_loss": float(self.epoch_loss_sum) / tokens,
                    "train_xent": float(self.epoch_xent_sum) / tokens}
        n = max(int(self.epoch_samples), 1)
        # loss: the surrogate (advantage-weighted NLL per sampled token) plus W times scst_xent, the
        # reference captions' cross-entropy (0 when off); tokens: sampled ones.
        return {"stage": "scst", "scst_loss": float(self.epoch_loss_sum) / tokens,
                "scst_xent": float(self.epoch_xent_sum) / tokens,
                "train_reward": float(self.epoch_reward_sum) / n, "train_baseline": float(self.epoch_baseline_sum) / n,
                "sample_length": tokens / n, "reward_share": reward_seconds / max(seconds, 1e-9)}

    def next_epoch(self) -> None:
        """Move to the next epoch's start: its first batch, its sums at zero."""
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        for name, _, initial in EPOCH_SUMS:
            self._variables[name].assign(initial)
