"""The best epochs so far: the best val loss and val CIDEr, and the epochs since the best on
--early-stopping-metric. Like orbit's NewBestMetric it keeps its state and answers one question
per epoch, whether the epoch is the new best; the loop acts on the answer (it saves the epoch
to checkpoints/best as well), and early stopping follows the count since the best.

The state is in the job's checkpoint under the keys best_val, best_cider and bad_epochs, so a
restarted job judges its epochs, and stops, where an uninterrupted one would have.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from trainer.state import variables


class Figure(NamedTuple):
    """A figure an epoch can be the best on: its name in messages, its history.json key, +1 when
    lower is better (-1: higher), and the checkpoint key of the best so far."""
    label: str
    key: str
    sign: int
    variable: str


BY_METRIC = {"loss": Figure("loss", "val_loss", 1, "best_val"), "cider": Figure("CIDEr", "val_CIDEr", -1, "best_cider")}

COUNTERS = (
    ("best_val", tf.float64, np.inf),
    # The best per-epoch val CIDEr (a job from before it existed restores without it: -inf).
    ("best_cider", tf.float64, -np.inf),
    # Epochs since the best on --early-stopping-metric.
    ("bad_epochs", tf.int64, 0),
)


class BestEpochs:
    """The best so far of each figure in BY_METRIC, and the epochs since the best on `metric`."""

    def __init__(self, metric: str):
        self.metric = metric
        self._variables = variables(COUNTERS)
        self.bad_epochs = self._variables["bad_epochs"]

    def checkpointed(self) -> dict[str, tf.Variable]:
        return dict(self._variables)

    def value(self, metric: str) -> float | None:
        """The best `metric` so far (None: no epoch had it)."""
        best = float(self._variables[BY_METRIC[metric].variable])
        return None if np.isinf(best) else best

    def judge(self, record: dict) -> bool:
        """Take in an epoch's history record. -> whether it is the best so far on the followed
        metric. An epoch without a figure (validation off) counts neither way."""
        better = {}
        for metric, figure in BY_METRIC.items():
            best, value = self._variables[figure.variable], record.get(figure.key)
            better[metric] = value is not None and figure.sign * value < figure.sign * float(best)
            if better[metric]:
                best.assign(value)
        if better[self.metric]:
            self.bad_epochs.assign(0)
        elif record.get(BY_METRIC[self.metric].key) is not None:
            self.bad_epochs.assign_add(1)
        return better[self.metric]

    def since_best(self) -> int:
        return int(self.bad_epochs)

    def new_stage(self) -> None:
        """A new stage counts its own epochs since the best."""
        self.bad_epochs.assign(0)
