"""What every pipeline command does around Beam, in one place: its runner's checks
before anything is written, running or only translating the pipeline (--dry_run),
and Beam's loggers at the command line.

    python -m pipelines.preprocess ...      COCO -> a data directory
    python -m pipelines.caption_images ...  images + an export -> captions

Both run on Beam's DirectRunner by default and on Dataflow with
`--runner DataflowRunner --project P --region R --temp_location gs://... --setup_file ./setup.py`.
"""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from caption_io import cli, fileio


class UsageError(ValueError, cli.UserError):
    """A bad flag: reported as one line, exit code 2."""


def runner_of(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or "DirectRunner"


def is_dataflow(runner: str) -> bool:
    return runner.rsplit(".", 1)[-1].lower().removesuffix("runner") == "dataflow"


def check_remote_paths(runner: str, paths: dict) -> None:
    """Workers of a remote runner cannot read or write this machine's files.
    paths: {flag: value or None}."""
    if not is_dataflow(runner):
        return
    for flag, value in paths.items():
        if value and not fileio.is_gcs(value):
            raise UsageError(f"{flag} {value}: Dataflow workers cannot reach this machine's files; give a gs:// path")


def validate_options(options: PipelineOptions, runner: str) -> None:
    """Beam's own checks of its flags (Dataflow: project, region, job name, gs://
    locations, worker counts), run before anything is written."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner

    try:
        errors = PipelineOptionsValidator(options, create_runner(runner)).validate()
    except ValueError as e:  # an unknown --runner
        raise UsageError(f"--runner {runner}: {str(e).split('. Valid values')[0]}") from None
    if errors:
        raise UsageError("Beam options: " + "; ".join(" ".join(e.split()) for e in errors))


def run_pipeline(options: PipelineOptions, build) -> dict | None:
    """Build the pipeline with build(p) and run it to the end.

    With Beam's `--dry_run=True` a remote runner only translates it (Dataflow: checked,
    pickled and turned into a job, nothing submitted): returns {"dry_run": True,
    "runner": ..., "pipeline": the job's pipeline proto}; otherwise None.
    """
    with beam.Pipeline(options=options) as p:
        build(p)
    # (Runners that run here ignore --dry_run: they have run the pipeline.)
    job = getattr(p.runner, "job", None) if options.view_as(TestOptions).dry_run else None
    if job is not None:
        return {"dry_run": True, "runner": runner_of(options), "pipeline": job.proto_pipeline}
    return None


def quiet_beam_logging() -> None:
    """Beam's loggers at a command line: warnings only, a DoFn's error once (the command
    reports it in one line), and on Dataflow the job id, console link and state changes."""
    if not cli.is_verbose():
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        # A DoFn's error is logged with its traceback as it is re-raised.
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    for name in ("apache_beam.runners.dataflow.internal.apiclient", "apache_beam.runners.dataflow.dataflow_runner"):
        logging.getLogger(name).setLevel(logging.DEBUG if cli.is_verbose() else logging.INFO)
    logging.getLogger().addFilter(_no_resource_warning)


def _no_resource_warning(record: logging.LogRecord) -> bool:
    """RunInference warns on the root logger, at each batch, that it cannot measure memory
    whenever PyTorch is not installed (its model manager imports torch beside Python's
    resource module); this project has no PyTorch, so the line would only be noise."""
    return not record.getMessage().startswith("Resource module is not available")


def without_step(e: BaseException) -> str:
    """An error raised in a DoFn, without the step name Beam appends to its message."""
    return str(e).split(" [while running")[0]


DRY_RUN_LINE = "dry run: the pipeline was translated for {runner}; nothing was submitted"
