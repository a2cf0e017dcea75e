"""The layout of a training job directory, and the paths its files record.

    JOB_DIR/
      config.json          the model's CaptionerConfig (a resumed job must agree with it)
      job.json             the job's settings; "data" is the data directory, absolute when
                           written, and "data_relative" the same seen from JOB_DIR; "encoder"
                           the data's encoder record (metadata.json's), to check other data against
      checkpoints/         the newest checkpoints (tf.train.CheckpointManager's "checkpoint" file)
      checkpoints/best/    the checkpoint of the best epoch so far on --early-stopping-metric
                           (the val loss, or the val CIDEr)
      history.json         one record an epoch: losses (SCST epochs: "stage": "scst", reward,
                           baseline), the caption metrics, times
      cider_df.npz         with --scst-epochs: the reward's document frequencies (caption_eval.cider_d)
      initial_val.json  metrics.json  loss.png
      logs/train  logs/val TensorBoard (val: the epochs' losses, caption metrics, times, samples)
      final/               the last weights as .weights.h5, and their config.json
      export/              the SavedModel (caption_serving.export)
      eval-SPLIT/          its evaluation on SPLIT: results.json, metrics.json, gallery/

A job directory is used from other folders and machines (evaluation, export, a copy
in a bucket), so what it records is resolved when written, and a recorded path that
is missing is followed relative to the job, then reported with where it came from.
"""
from __future__ import annotations

import os

from caption_io import cli, fileio

CONFIG_FILE = "config.json"
JOB_FILE = "job.json"
CHECKPOINTS = "checkpoints"
BEST = "checkpoints/best"
HISTORY_FILE = "history.json"
INITIAL_VAL_FILE = "initial_val.json"
METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"
FINAL = "final"
EXPORT = "export"
LOGS = "logs"
JOB_ENCODER = "encoder"  # job.json's copy of the data's encoder record
CIDER_DF = "cider_df.npz"  # the SCST reward's document frequencies over the training captions


def eval_dir(split: str) -> str:
    """The folder, beside the export, that an evaluation of `split` writes."""
    return f"eval-{split}"


class RecordedPathError(ValueError, cli.UserError):
    """A path a job or export records that is not there; str() says where it came from."""


def record_data(record: dict, data_dir: str, home: str) -> dict:
    """`record` with the data directory as "data" (absolute) and "data_relative" (from `home`,
    the folder the record describes, so that the two copied side by side stay linked)."""
    return dict(record, data=fileio.absolute(data_dir), data_relative=fileio.relative(data_dir, home))


def recorded_data(record: dict, record_file: str, home: str, flag: str = "--data") -> str:
    """The data directory a record names: as recorded if it is there, else the same place
    relative to `home`; neither: a RecordedPathError naming `record_file` and `flag`."""
    recorded = record.get("data")
    if not recorded:
        raise RecordedPathError(f"{record_file} records no data directory: pass {flag} DATA_DIR")
    if fileio.exists(recorded):
        return recorded
    beside = fileio.join(home, record["data_relative"]) if record.get("data_relative") else None
    if beside and not fileio.is_gcs(beside):
        beside = os.path.normpath(beside)
    if beside and fileio.exists(beside):
        return beside
    also = f" (nor is {beside}, where it was relative to this folder)" if beside else ""
    raise RecordedPathError(f"{record_file} records the data directory {recorded}, which does not exist{also}: "
                            f"pass {flag} DATA_DIR")


def recorded_encoder(job_dir: str) -> dict | None:
    """The encoder record job.json keeps (None: a job from before it kept one, or no job.json)."""
    path = fileio.join(job_dir, JOB_FILE)
    return fileio.read_json(path).get(JOB_ENCODER) if fileio.exists(path) else None


def data_dir(job_dir: str, override: str | None = None, flag: str = "--data") -> str:
    """The data directory a job trained on (`override`, when given, wins)."""
    if override:
        return override
    path = fileio.join(job_dir, JOB_FILE)
    if not fileio.exists(path):
        raise RecordedPathError(f"{job_dir}: no {JOB_FILE} (is this a training job directory?): pass {flag} DATA_DIR")
    return recorded_data(fileio.read_json(path), path, job_dir, flag)
