"""trainer.launch: the Vertex AI job it would submit (dry run, field by field), its flag
errors, what it hands to aiplatform (faked in-process, no network), and that the trainer's
strategy reads the TF_CONFIG Vertex AI sets (a chief and workers, on loopback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import exit_code, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA, JOB = "gs://bucket/coco-data", "gs://bucket/jobs/coco"
IMAGE = "us-central1-docker.pkg.dev/proj/trainers/captioner:1"
EXECUTOR = "us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
PACKAGE = "gs://bucket/dist/show-attend-tell-0.1.0.tar.gz"
BASE = ["--project", "proj", "--region", "us-central1", "--data", DATA, "--job-dir", JOB]


def launch(*args, env=None):
    return subprocess.run([sys.executable, "-m", "trainer.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def dry_run(*args):
    proc = launch(*BASE, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_two_gpu_workers_from_a_container_image():
    spec = dry_run("--image", IMAGE, "--machine-type", "n1-standard-16", "--accelerator-type", "NVIDIA_TESLA_T4",
                   "--accelerator-count", "2", "--workers", "3", "--display-name", "coco-t4",
                   "--", "--epochs", "20", "--batch-size", "256")
    assert spec["display_name"] == "coco-t4"
    assert (spec["project"], spec["location"]) == ("proj", "us-central1")
    assert spec["base_output_dir"] == JOB and spec["staging_bucket"] == "gs://bucket"
    chief, workers = spec["worker_pool_specs"]  # exactly two pools
    assert chief["replica_count"] == 1 and workers["replica_count"] == 2
    for pool in (chief, workers):
        assert pool["machine_spec"] == {"machine_type": "n1-standard-16", "accelerator_type": "NVIDIA_TESLA_T4",
                                        "accelerator_count": 2}
        assert "python_package_spec" not in pool
        c = pool["container_spec"]
        assert c["image_uri"] == IMAGE and c["command"] == ["python", "-m", "trainer.task"]
        assert c["args"] == ["--data", DATA, "--job-dir", JOB, "--epochs", "20", "--batch-size", "256",
                             "--strategy", "auto"]


def test_one_worker_from_a_package_has_no_accelerator_fields():
    spec = dry_run("--package-uri", PACKAGE, "--executor-image", EXECUTOR, "--service-account", "sa@proj.iam",
                   "--staging-bucket", "gs://staging")
    assert spec["display_name"].startswith("show-attend-tell-")
    assert spec["service_account"] == "sa@proj.iam" and spec["staging_bucket"] == "gs://staging"
    (pool,) = spec["worker_pool_specs"]
    assert pool["replica_count"] == 1
    assert pool["machine_spec"] == {"machine_type": "n1-standard-8"}
    assert "container_spec" not in pool
    assert pool["python_package_spec"] == {"executor_image_uri": EXECUTOR, "package_uris": [PACKAGE],
                                           "python_module": "trainer.task",
                                           "args": ["--data", DATA, "--job-dir", JOB, "--strategy", "auto"]}


def test_a_strategy_given_to_the_trainer_is_not_doubled():
    spec = dry_run("--image", IMAGE, "--", "--strategy", "mirrored")
    args = spec["worker_pool_specs"][0]["container_spec"]["args"]
    assert args == ["--data", DATA, "--job-dir", JOB, "--strategy", "mirrored"]


@pytest.mark.parametrize("args, flag", [
    (["--data", "/home/me/coco-data", "--image", IMAGE], "--data"),
    (["--job-dir", "jobs/coco", "--image", IMAGE], "--job-dir"),
    (["--image", IMAGE, "--accelerator-type", "NVIDIA_TESLA_T5", "--accelerator-count", "1"], "--accelerator-type"),
    (["--image", IMAGE, "--accelerator-count", "2"], "--accelerator-count"),
    (["--image", IMAGE, "--accelerator-type", "NVIDIA_L4"], "--accelerator-count"),
    (["--image", IMAGE, "--workers", "0"], "--workers"),
    (["--image", IMAGE, "--package-uri", PACKAGE, "--executor-image", EXECUTOR], "--package-uri"),
    (["--package-uri", PACKAGE], "--executor-image"),
    ([], "--image"),
    (["--image", IMAGE, "--", "--epochs", "0"], "--epochs"),
    (["--image", IMAGE, "--", "--no-such-flag"], "--no-such-flag"),
    (["--image", IMAGE, "--", "--data", "gs://other/data"], "--data"),
    (["--image", IMAGE, "--workers", "2", "--", "--strategy", "mirrored"], "--strategy"),
])
def test_bad_flags_are_one_line_naming_the_flag(args, flag, capsys, clean_logging):
    # In-process (the command's main with an argv): a process each cost seconds of start-up; the
    # test below runs one case as the real process. Later flags win in argparse: BASE's
    # --data/--job-dir are overridden where a case sets them.
    from trainer import launch as launch_mod

    assert exit_code(launch_mod.main, [*BASE, "--dry-run", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert out == ""
    if flag in ("--data", "--job-dir") and "--" not in args:
        assert "gs://" in lines[0] and "local" in lines[0]


def test_a_bad_flag_is_one_line_from_the_process_too():
    proc = launch(*BASE, "--dry-run", "--image", IMAGE, "--workers", "0")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--workers" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_the_spec_is_checked_against_the_api_types():
    from trainer import launch as launch_mod

    a = launch_mod.parse_args([*BASE, "--image", IMAGE])
    spec = launch_mod.job_spec(a)
    launch_mod.check_spec(spec)
    spec["worker_pool_specs"][0]["machine_spec"]["machine_typ"] = "n1-standard-8"
    with pytest.raises(ValueError, match="machine_typ"):
        launch_mod.check_spec(spec)


class FakeJob:
    """Stands in for aiplatform.CustomJob: records what it was given, calls no API."""
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.submitted, self.waited = kwargs, None, False
        FakeJob.made.append(self)

    def submit(self, **kwargs):
        self.submitted = kwargs

    @property
    def resource_name(self):
        return "projects/123/locations/us-central1/customJobs/456"

    def _dashboard_uri(self):
        return "https://console.cloud.google.com/vertex-ai/locations/us-central1/training/456?project=123"

    def wait_for_completion(self):
        self.waited = True


@pytest.fixture
def fake_aiplatform(monkeypatch):
    from google.cloud import aiplatform

    inits = []
    FakeJob.made = []
    monkeypatch.setattr(aiplatform, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(aiplatform, "CustomJob", FakeJob)
    return inits


def test_submit_hands_the_spec_to_aiplatform(fake_aiplatform, capsys):
    from trainer import launch as launch_mod

    argv = [*BASE, "--image", IMAGE, "--accelerator-type", "NVIDIA_L4", "--accelerator-count", "1",
            "--workers", "2", "--display-name", "coco-l4", "--service-account", "sa@proj.iam", "--", "--epochs", "3"]
    assert launch_mod.main(argv) == 0
    expected = launch_mod.job_spec(launch_mod.parse_args(argv))
    assert fake_aiplatform == [{"project": "proj", "location": "us-central1", "staging_bucket": "gs://bucket"}]
    (job,) = FakeJob.made
    assert job.kwargs == {"display_name": "coco-l4", "worker_pool_specs": expected["worker_pool_specs"],
                          "base_output_dir": JOB}
    assert [p["replica_count"] for p in job.kwargs["worker_pool_specs"]] == [1, 1]
    assert job.submitted == {"service_account": "sa@proj.iam"}
    assert not job.waited  # submits and returns unless --wait
    out = capsys.readouterr().out.split()
    assert out == [job.resource_name, job._dashboard_uri()]

    assert launch_mod.main(["--wait", *argv]) == 0
    assert FakeJob.made[-1].waited


def test_submission_errors_are_one_line(fake_aiplatform, monkeypatch, capsys):
    from google.api_core import exceptions

    from trainer import launch as launch_mod

    def refuse(self, **kwargs):
        raise exceptions.PermissionDenied("aiplatform.customJobs.create denied\non project proj")

    monkeypatch.setattr(FakeJob, "submit", refuse)
    assert launch_mod.main([*BASE, "--image", IMAGE, "--display-name", "x"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Vertex AI job x: ") and "denied" in lines[0], lines


def test_submission_without_credentials_fails_in_one_line(tmp_path):
    # Point Application Default Credentials at nothing: the real client must fail before any request.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
    env.update(HOME=str(tmp_path), GCE_METADATA_HOST="127.0.0.1:9", NO_GCE_CHECK="True")
    proc = launch(*BASE, "--image", IMAGE, env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "credentials" in lines[0], proc.stderr


# One replica of a Vertex AI job: TF_CONFIG as Vertex sets it (workerpool0 = "chief",
# workerpool1 = "worker", plus "environment" and "job"), then the trainer's strategy choice.
_REPLICA = """
import json, sys
from trainer import distribute
s = distribute.get_strategy("auto")
print(json.dumps({"replicas": s.num_replicas_in_sync, "chief": distribute.is_chief(s)}))
"""



def test_the_strategy_reads_a_vertex_tf_config_with_a_chief():
    cluster = {"chief": [f"127.0.0.1:{free_port()}"], "worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    tasks = [("chief", 0), ("worker", 0), ("worker", 1)]
    procs = []
    for kind, index in tasks:
        tf_config = {"cluster": cluster, "task": {"type": kind, "index": index, "trial": ""},
                     "environment": "cloud", "job": {"python_module": "trainer.task"}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
        procs.append(subprocess.Popen([sys.executable, "-c", _REPLICA], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:  # a replica left waiting for a failed peer would wait forever
            if p.poll() is None:
                p.kill()
                p.wait()
    # Three replicas train together (MultiWorkerMirrored), and only the chief writes the job's
    # outputs: worker 0 is not the chief when the cluster has one.
    assert [r["replicas"] for r in results] == [3, 3, 3]
    assert [r["chief"] for r in results] == [True, False, False]
