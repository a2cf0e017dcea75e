"""A job used from another folder, or copied elsewhere: the paths it records are
absolute, followed relative to the job when the original is gone, and a missing one
is reported with the file that recorded it and the flag that overrides it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from caption_eval import evaluate
from caption_serving import export
from trainer import task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def relative_job(small_data, tmp_path_factory):
    """A job trained and exported from its own folder with relative paths: ORIGIN/{data,job}."""
    origin = tmp_path_factory.mktemp("origin")
    shutil.copytree(small_data, origin / "data")
    here = os.getcwd()
    os.chdir(origin)
    try:
        assert task.main(["--data", "data", "--job-dir", "job", "--units", "32", "--embedding-dim", "16",
                          "--batch-size", "8", "--epochs", "1", "--no-progress", "--no-eval"]) == 0
    finally:
        os.chdir(here)
    return origin


def _last_err(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_what_a_job_records_is_absolute(relative_job):
    job = json.load(open(relative_job / "job" / "job.json"))
    assert job["data"] == str(relative_job / "data") and job["data_relative"] == "../data"
    assert job["job_dir"] == str(relative_job / "job")
    info = json.load(open(relative_job / "job" / "export" / "assets.extra" / "export.json"))
    assert info["data"] == str(relative_job / "data") and info["data_relative"] == "../../data"
    assert info["checkpoint"] == str(relative_job / "job" / "checkpoints" / "ckpt-9")


def test_evaluate_and_the_latency_benchmark_run_from_another_folder(relative_job, tmp_path, monkeypatch, scene_dir):
    # (the export from another folder: test_a_job_copied_with_its_data_follows_the_copy)
    monkeypatch.chdir(tmp_path)
    model = str(relative_job / "job" / "export")
    assert evaluate.main(["--model", model, "--split", "val", "--gallery", "0", "--output", "ev"]) == 0
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["data"] == str(relative_job / "data")
    image = sorted(os.listdir(os.path.join(scene_dir, "val2014")))[0]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving_latency", "--model", model, "--repeats", "1",
                           "--image", os.path.join(scene_dir, "val2014", image)], cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("RESULT ")


def test_a_job_copied_with_its_data_follows_the_copy(relative_job, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(relative_job / "data", copy / "data")
    shutil.copytree(relative_job / "job", copy / "job")
    # The original data out of reach, as on another machine (put back afterwards for other tests).
    hidden = relative_job / "data.hidden"
    os.rename(relative_job / "data", hidden)
    try:
        monkeypatch.chdir(tmp_path)
        assert evaluate.main(["--model", str(copy / "job" / "export"), "--gallery", "0"]) == 0
        assert json.load(open(copy / "job" / "eval-val" / "metrics.json"))["data"] == str(copy / "data")
        assert export.main(["--job-dir", str(copy / "job")]) == 0
        assert json.load(open(copy / "job" / "export" / "assets.extra" / "export.json"))["data"] == str(copy / "data")
    finally:
        os.rename(hidden, relative_job / "data")


def test_a_job_copied_without_its_data_names_the_record_and_the_flag(relative_job, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "lone" / "job"
    shutil.copytree(relative_job / "job", copy)
    hidden = relative_job / "data.hidden"
    os.rename(relative_job / "data", hidden)
    try:
        monkeypatch.chdir(tmp_path)
        model = str(copy / "export")
        assert evaluate.main(["--model", model, "--gallery", "0"]) == 2
        assert _last_err(capsys) == (
            f"error: {model}/assets.extra/export.json records the data directory {relative_job}/data, which does "
            f"not exist (nor is {copy.parent}/data, where it was relative to this folder): pass --data DATA_DIR")
        assert export.main(["--job-dir", str(copy)]) == 2
        assert _last_err(capsys) == (
            f"error: {copy}/job.json records the data directory {relative_job}/data, which does not exist (nor is "
            f"{copy.parent}/data, where it was relative to this folder): pass --data DATA_DIR")
        # The override flags.
        assert evaluate.main(["--model", model, "--gallery", "0", "--data", str(hidden)]) == 0
        assert export.main(["--job-dir", str(copy), "--data", str(hidden)]) == 0
    finally:
        os.rename(hidden, relative_job / "data")
