"""Submit the trainer to Vertex AI as a custom job.

    python -m trainer.launch --project P --region R --data gs://... --job-dir gs://...
        [--machine-type n1-standard-8] [--accelerator-type NVIDIA_TESLA_T4 --accelerator-count N]
        [--workers N] (--image URI | --package-uri gs://.../show-attend-tell-0.1.0.tar.gz --executor-image URI)
        [--display-name NAME] [--service-account EMAIL] [--staging-bucket gs://...]
        [--dry-run] [--wait] [-- TRAINER ARGS, e.g. --epochs 20 --batch-size 256]

Each replica runs `python -m trainer.task --data ... --job-dir ... TRAINER ARGS --strategy auto`.
Worker pool 0 is the chief (one replica); with --workers N > 1, pool 1 holds the other N-1.
Vertex AI sets TF_CONFIG on every replica, so `--strategy auto` becomes MultiWorkerMirrored.
--image is a container with the project installed (docker/trainer.Dockerfile); --package-uri
is this package as an sdist (`python setup.py sdist`, copied to GCS) run on --executor-image.

--dry-run prints the job as JSON (checked against Vertex AI's own message types) and submits
nothing. Otherwise the job is submitted and its resource name and console URL are printed;
--wait then blocks until it ends. Exit status: 0 submitted (or succeeded with --wait),
1 submission or job failed, 2 bad flags.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before the trainer's flags import TensorFlow
    from caption_io import quiet

    quiet.install()

import json
import sys
import time

from caption_io import cli, fileio

PACKAGE = "show-attend-tell"
TRAINER_MODULE = "trainer.task"
# Stands in for --data/--job-dir while the trainer's parser checks the trailing args: if it
# comes back changed, the user set them after `--` too.
_UNSET = "<given to the launcher>"


def parse_args(argv):
    argv = list(argv)
    # Everything after `--` belongs to the trainer; argparse would try to read it as ours.
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = _parser()
    a = ap.parse_args(own)
    _check_launch(ap, a)
    a.trainer_args = _trainer_args(ap, a, trainer_args)
    return a


def _parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m trainer.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--region", required=True, help="e.g. us-central1")
    ap.add_argument("--data", required=True, help="gs:// data directory from pipelines.preprocess")
    ap.add_argument("--job-dir", required=True, help="gs:// directory for checkpoints, logs and the export")
    ap.add_argument("--machine-type", default="n1-standard-8")
    ap.add_argument("--accelerator-type", help="e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_TESLA_A100")
    ap.add_argument("--accelerator-count", type=int, default=0, help="accelerators per replica")
    ap.add_argument("--workers", type=int, default=1, help="replicas in all, the chief included")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="trainer container image (docker/trainer.Dockerfile)")
    src.add_argument("--package-uri", help="gs:// sdist of this package, run on --executor-image")
    ap.add_argument("--executor-image", help="Vertex AI training image that runs --package-uri")
    ap.add_argument("--display-name", help=f"default: {PACKAGE}-YYYYmmdd-HHMMSS")
    ap.add_argument("--service-account", help="the job's run-as service account")
    ap.add_argument("--staging-bucket", help="default: the bucket of --job-dir")
    ap.add_argument("--dry-run", action="store_true", help="print the job spec as JSON, submit nothing")
    ap.add_argument("--wait", action="store_true", help="block until the job ends")
    return ap


def _check_launch(ap: cli.Parser, a) -> None:
    """The launcher's own flags, checked together (ap.error: one line, exit 2)."""
    # Vertex replicas run on Google's machines: a path on this one means nothing there.
    for flag, value in (("--data", a.data), ("--job-dir", a.job_dir), ("--package-uri", a.package_uri),
                        ("--staging-bucket", a.staging_bucket)):
        if value is not None and not fileio.is_gcs(value):
            ap.error(f"{flag} {value}: must be a gs:// path (Vertex AI workers cannot see local paths)")
    if a.workers < 1:
        ap.error(f"--workers must be at least 1, got {a.workers}")
    if a.accelerator_type is None and a.accelerator_count:
        ap.error("--accelerator-count needs --accelerator-type")
    if a.accelerator_type is not None:
        if a.accelerator_count < 1:
            ap.error(f"--accelerator-type {a.accelerator_type} needs --accelerator-count of at least 1")
        from google.cloud.aiplatform_v1.types import AcceleratorType

        names = [t.name for t in AcceleratorType if t.value]  # not ACCELERATOR_TYPE_UNSPECIFIED
        if a.accelerator_type not in names:
            ap.error(f"--accelerator-type {a.accelerator_type}: choose one of {', '.join(names)}")
    if bool(a.package_uri) != bool(a.executor_image):
        ap.error("--package-uri and --executor-image go together (use --image for a container)")


def _trainer_args(ap: cli.Parser, a, trainer_args: list[str]) -> list[str]:
    """The trainer's command line on every replica, its flags checked here: a trainer flag that is
    wrong should fail in seconds, not after the cluster starts."""
    from trainer import task  # imports TensorFlow: its start-up lines are filtered (caption_io.quiet)
    settings = task.parse_args(["--data", _UNSET, "--job-dir", _UNSET, *trainer_args])
    if settings.data != _UNSET or settings.job_dir != _UNSET:
        ap.error("give --data and --job-dir to the launcher, not after --")
    if a.workers > 1 and settings.strategy not in ("auto", "multi_worker"):
        ap.error(f"--strategy {settings.strategy} with --workers {a.workers}: the workers would not "
                 "train together (use auto or multi_worker)")
    # The trainer's own choice when the user made one, else auto (TF_CONFIG decides).
    strategy = [] if _has_flag(trainer_args, "--strategy") else ["--strategy", "auto"]
    return ["--data", a.data, "--job-dir", a.job_dir, *trainer_args, *strategy]


def _has_flag(args, flag):
    return any(x == flag or x.startswith(flag + "=") for x in args)


def _pool(a, replicas: int) -> dict:
    machine = {"machine_type": a.machine_type}
    if a.accelerator_type:
        machine.update(accelerator_type=a.accelerator_type, accelerator_count=a.accelerator_count)
    if a.image:
        code = {"container_spec": {"image_uri": a.image, "command": ["python", "-m", TRAINER_MODULE],
                                   "args": list(a.trainer_args)}}
    else:
        code = {"python_package_spec": {"executor_image_uri": a.executor_image, "package_uris": [a.package_uri],
                                        "python_module": TRAINER_MODULE, "args": list(a.trainer_args)}}
    return {"machine_spec": machine, "replica_count": replicas, **code}


def job_spec(a) -> dict:
    """The custom job, in the shapes aiplatform.init and aiplatform.CustomJob take."""
    # Vertex AI calls pool 0's replica "chief" and pool 1's "worker" in TF_CONFIG;
    # trainer/distribute.py counts both and lets only the chief write the job's outputs.
    pools = [_pool(a, 1)] + ([_pool(a, a.workers - 1)] if a.workers > 1 else [])
    bucket, _ = fileio.split_gcs(a.job_dir)
    return {
        "project": a.project,
        "location": a.region,
        "staging_bucket": a.staging_bucket or f"gs://{bucket}",
        "display_name": a.display_name or f"{PACKAGE}-{time.strftime('%Y%m%d-%H%M%S')}",
        "service_account": a.service_account,
        "base_output_dir": a.job_dir,
        "worker_pool_specs": pools,
    }


def check_spec(spec: dict) -> None:
    """Build the API's own CustomJob message: a misspelt field or enum fails here, not on submit."""
    from google.cloud.aiplatform_v1.types import CustomJob

    CustomJob(display_name=spec["display_name"],
              job_spec={"worker_pool_specs": spec["worker_pool_specs"],
                        "base_output_directory": {"output_uri_prefix": spec["base_output_dir"]},
                        "service_account": spec["service_account"] or ""})


def submit(spec: dict, wait: bool = False):
    from google.cloud import aiplatform

    aiplatform.init(project=spec["project"], location=spec["location"], staging_bucket=spec["staging_bucket"])
    job = aiplatform.CustomJob(display_name=spec["display_name"], worker_pool_specs=spec["worker_pool_specs"],
                               base_output_dir=spec["base_output_dir"])
    # submit() returns once the job is created; run() would also block until it ends.
    job.submit(service_account=spec["service_account"])
    print(job.resource_name)
    print(job._dashboard_uri())  # the library's console URL (its path changes between releases)
    sys.stdout.flush()
    if wait:
        job.wait_for_completion()
    return job


class SubmitError(cli.UserError):
    """Vertex AI refused the job, or it failed (--wait): exit 1, the flags were fine."""

    exit_code = 1


@cli.command
def main(argv=None) -> int:
    a = parse_args(argv)
    spec = job_spec(a)
    try:
        check_spec(spec)
    except (ValueError, KeyError) as e:  # exit 2: the flags made it
        raise cli.UserError(f"the job spec is not a valid Vertex AI CustomJob: {e}") from None
    if a.dry_run:
        print(json.dumps(spec, indent=2))
        return 0
    from google.api_core import exceptions as api_errors
    from google.auth import exceptions as auth_errors

    try:
        submit(spec, wait=a.wait)
    except (auth_errors.GoogleAuthError, api_errors.GoogleAPIError, RuntimeError, ValueError) as e:
        why = " ".join(str(e).split()) or type(e).__name__  # API errors span lines: keep one
        raise SubmitError(f"Vertex AI job {spec['display_name']}: {why}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
