"""The trainer's user-error type: a job that cannot start, or cannot go on, in one readable line."""
from __future__ import annotations

from caption_io import cli


class TrainError(ValueError, cli.UserError):
    """A job that cannot start (one readable line, before any training)."""
