"""The pipeline translated for Dataflow, with the flags docs/scaling.md gives, without submitting.

Beam's `--dry_run=True` makes DataflowRunner do everything up to the submission:
validate the options, pickle every step, build the SDK dependencies (--setup_file
builds the package) and turn the pipeline into a job. A broken option or a step
that cannot be pickled fails here, not on a paid cluster. The gs:// paths point at
the loopback Cloud Storage emulator (conftest's `gcs`), since the launcher writes
the encoder weights and the manifests there before the pipeline starts.
"""
from __future__ import annotations

import os

import pytest

from caption_io import datadir, fileio
from pipelines import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "us-central1-docker.pkg.dev/my-project/captioner/worker:2.77"


def _dataflow_flags(gcs, *extra):
    # As docs/scaling.md ("Preprocess on Dataflow") gives them.
    return ["--runner", "DataflowRunner", "--project", "my-project", "--region", "us-central1",
            "--temp_location", f"{gcs}/tmp", "--dry_run=True", *extra]


@pytest.fixture(scope="module")
def gcs_coco(gcs, scene_dir):
    """The scene set's COCO layout copied into the bucket, as a user's COCO copy would be."""
    base = fileio.join(gcs, "coco")
    for root, _, files in os.walk(scene_dir):
        for f in files:
            local = os.path.join(root, f)
            fileio.upload(local, fileio.join(base, os.path.relpath(local, scene_dir)))
    return base


def _run(gcs, gcs_coco, out, *extra):
    return preprocess.run(["--coco-dir", gcs_coco, "--output", fileio.join(gcs, out), "--overwrite",
                           "--encoder-weights", "random", "--num-shards", "train=4,val=2"]
                          + _dataflow_flags(gcs, *extra))


def _transform_names(pipeline) -> set[str]:
    return {t.unique_name for t in pipeline.components.transforms.values()}


def test_translates_with_setup_file(gcs, gcs_coco):
    result = _run(gcs, gcs_coco, "data-setup", "--setup_file", os.path.join(ROOT, "setup.py"))
    assert result["dry_run"] and result["runner"] == "DataflowRunner"
    names = _transform_names(result["pipeline"])
    for split in ("train", "val"):
        assert f"Read[{split}]" in names
    for step in ("CheckInputs/Tokenize", "CheckInputs/CheckImage", "Vocabulary/SelectTokens",
                 "EncodeShards/GroupByShard", "EncodeShards/Encode"):
        assert step in names, step
    # Only the small manifest entries are grouped by shard; no step groups the encoded records.
    assert not any("WriteToTFRecord" in n or n.startswith("WriteShards") for n in names)
    assert {"WriteMetadata", "WriteRejects", "ChannelStats"} <= names
    # --setup_file: the package was built and travels with the job to every worker.
    envs = list(result["pipeline"].components.environments.values())
    staged = [d.role_payload for env in envs for d in env.dependencies]
    assert any(b"workflow.tar.gz" in p for p in staged), staged
    # The launcher's work went to the bucket; the pipeline itself ran nowhere.
    out = fileio.join(gcs, "data-setup")
    assert fileio.exists(fileio.join(out, datadir.encoder_file("inception_v3")))
    assert fileio.exists(fileio.join(out, "inputs", "train.jsonl"))
    assert not fileio.exists(fileio.join(out, preprocess.METADATA_FILE))


def test_translates_with_custom_container(gcs, gcs_coco):
    result = _run(gcs, gcs_coco, "data-image", "--sdk_container_image", IMAGE)
    from apache_beam.portability.api import beam_runner_api_pb2

    images = set()
    for env in result["pipeline"].components.environments.values():
        payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload)
        images.add(payload.container_image)
    assert images == {IMAGE}


def test_main_says_nothing_was_submitted(gcs, gcs_coco, capsys):
    argv = ["--coco-dir", gcs_coco, "--output", fileio.join(gcs, "data-main"), "--encoder-weights", "random"]
    assert preprocess.main(argv + _dataflow_flags(gcs, "--sdk_container_image", IMAGE)) == 0
    assert "nothing was submitted" in capsys.readouterr().out


def test_local_paths_are_refused_for_dataflow(gcs, gcs_coco, scene_dir, tmp_path, capsys):
    for argv, flag in ((["--coco-dir", scene_dir, "--output", fileio.join(gcs, "x")], "--coco-dir"),
                       (["--coco-dir", gcs_coco, "--output", str(tmp_path)], "--output")):
        assert preprocess.main(argv + _dataflow_flags(gcs)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} ") and "gs://" in err and len(err.splitlines()) == 1


def test_a_step_that_cannot_be_pickled_fails_before_submission(gcs, gcs_coco, monkeypatch):
    from pipelines.transforms import encode

    original = encode.EncodeShard.__init__

    def holding_a_generator(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._batches = (b for b in range(3))  # what a careless DoFn might keep: cannot be pickled

    monkeypatch.setattr(encode.EncodeShard, "__init__", holding_a_generator)
    with pytest.raises(Exception, match="(?i)pickl|generator"):
        _run(gcs, gcs_coco, "data-broken", "--sdk_container_image", IMAGE)


@pytest.mark.parametrize("change, words", [
    (("--project", "my project"), "Invalid Project ID"),
    (("--job_name", "My_Job"), "Invalid job_name"),
    (("--num_workers", "-3"), "num_workers"),
    (("--runner", "DataflowRuner"), "--runner DataflowRuner"),
])
def test_a_broken_option_fails_before_anything_is_written(gcs, gcs_coco, capsys, change, words):
    out = fileio.join(gcs, "data-badopt")
    flags = _dataflow_flags(gcs)
    if change[0] in flags:
        flags[flags.index(change[0]) + 1] = change[1]
    else:
        flags += list(change)
    assert preprocess.main(["--coco-dir", gcs_coco, "--output", out, "--encoder-weights", "random"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not fileio.exists(out)


# ------------------------------------------------------------------- batch captioning
@pytest.fixture(scope="module")
def gcs_export(gcs, trained_job):
    """What the launcher reads of an export, in the bucket (the workers would load the rest)."""
    from caption_io import savedmodel

    dest = fileio.join(gcs, "export")
    for rel in ("saved_model.pb", savedmodel.EXPORT_INFO):
        fileio.upload(os.path.join(trained_job, "export", rel), fileio.join(dest, rel))
    return dest


def test_caption_images_translates_for_dataflow(gcs, gcs_coco, gcs_export, capsys):
    from pipelines import caption_images

    argv = ["--images", fileio.join(gcs_coco, "val2014", "*.jpg"), "--model", gcs_export,
            "--output", fileio.join(gcs, "captions"), "--model-copies", "1"]
    result = caption_images.run(argv + _dataflow_flags(gcs, "--sdk_container_image", IMAGE))
    assert result["dry_run"] and result["runner"] == "DataflowRunner"
    names = _transform_names(result["pipeline"])
    for step in ("Match", "Caption/Read", "Caption/RunInference", "WriteCaptions", "WriteRejects", "WriteSummary"):
        assert any(n == step or n.startswith(step + "/") for n in names), step
    assert not fileio.exists(fileio.join(gcs, "captions", caption_images.SUMMARY_FILE))
    assert caption_images.main(argv + _dataflow_flags(gcs, "--sdk_container_image", IMAGE)) == 0
    assert "nothing was submitted" in capsys.readouterr().out
    # Local paths cannot be read by Dataflow's workers: one line naming the flag.
    assert caption_images.main(["--images", "/tmp/photos", "--model", gcs_export, "--output",
                                fileio.join(gcs, "c2")] + _dataflow_flags(gcs)) == 2
    assert capsys.readouterr().err.strip() == ("error: --images /tmp/photos: Dataflow workers cannot reach this "
                                                "machine's files; give a gs:// path")
