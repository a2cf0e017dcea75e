"""Each image encoder (model/backbones.py) end to end on the scene set with seeded random weights:
preprocess, an epoch of training, export, and a fresh process that loads the export, captions an
image and plots its attention over the backbone's own grid. InceptionV3, the default, goes this way
in the rest of the suite (tests/conftest.py's jobs); here the others. Random weights say nothing of
a backbone's quality: these tests hold the geometry and the plumbing, not the captions' words.

Cost: about a minute a backbone (the export and the fresh process are most of it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from caption_io import images, jobdir, metadata, records
from caption_serving import export
from model import backbones
from pipelines import preprocess
from trainer import loop, task

OTHERS = [n for n in backbones.NAMES if n != backbones.DEFAULT]


def test_each_backbone_prepares_its_pixels_as_its_network_expects():
    pixels = np.array([[[[0, 128, 255]]]], np.uint8)
    inception = backbones.get("inception_v3").prepare(pixels).numpy()
    assert inception.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(inception[0, 0, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    for name in OTHERS:  # these scale inside the network: 0..255 in
        b = backbones.get(name)
        x = b.prepare(pixels).numpy()
        assert x.shape == (1, b.geometry.input_size, b.geometry.input_size, 3)
        np.testing.assert_allclose(x[0, 0, 0], [0.0, 128.0, 255.0], atol=1e-4)


def test_an_unknown_backbone_is_one_line_naming_the_choices():
    with pytest.raises(backbones.BackboneError, match="encoder 'resnet50': choose one of inception_v3, "):
        backbones.get("resnet50")
    with pytest.raises(SystemExit):
        preprocess.parse_args(["--coco-dir", "x", "--output", "y", "--encoder", "resnet50"])


@pytest.fixture(scope="module", params=OTHERS)
def backbone_job(request, scene_dir, tmp_path_factory):
    """(backbone, data dir, job dir with its export) for one backbone."""
    backbone = backbones.get(request.param)
    work = tmp_path_factory.mktemp(backbone.name)
    data, job = str(work / "data"), str(work / "job")
    preprocess.run(["--coco-dir", scene_dir, "--output", data, "--encoder", backbone.name,
                    "--encoder-weights", "random", "--seed", "1", "--num-shards", "train=1,val=1"])
    loop.train(task.parse_args(["--data", data, "--job-dir", job, "--units", "32", "--embedding-dim", "16",
                                "--batch-size", "8", "--epochs", "1", "--no-progress", "--eval-images", "0"]))
    export.export(job)
    return backbone, data, job


def test_the_data_directory_records_the_backbone_and_holds_its_grid(backbone_job, scene_dir):
    backbone, data, _ = backbone_job
    meta = metadata.read(data)
    g = backbone.geometry
    assert (meta.encoder.name, meta.geometry) == (backbone.name, g)
    assert meta.to_dict()["encoder"]["grid"] == [g.rows, g.columns]
    assert meta.encoder.file == f"encoder/{backbone.name}.weights.h5"
    # The features are the saved encoder's last grid of the image, flattened row-major.
    encoder = backbone.load(os.path.join(data, meta.encoder.file))
    rec = records.read_records(metadata.shard_files(data, "val", meta))[0]
    with open(os.path.join(scene_dir, "val2014", rec["file_name"]), "rb") as f:
        pixels = images.decode(f.read())
    expected = encoder(backbone.prepare(pixels[None]), training=False).numpy()[0]
    assert rec["features"].shape == g.feature_shape == expected.shape
    np.testing.assert_allclose(rec["features"].astype(np.float32), expected, rtol=2e-3,
                               atol=2e-3 * np.abs(expected).max())


def test_a_fresh_process_captions_with_the_export_and_plots_the_grid(backbone_job, scene_dir, tmp_path):
    backbone, data, job = backbone_job
    with open(os.path.join(job, jobdir.CONFIG_FILE)) as f:
        config = json.load(f)
    assert (config["num_positions"], config["feature_dim"]) == backbone.geometry.feature_shape
    image = sorted(os.listdir(os.path.join(scene_dir, "val2014")))[0]
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "caption_serving.caption", os.path.join(scene_dir, "val2014", image),
                           "--model", os.path.join(job, jobdir.EXPORT), "--json", "--plot", str(plots),
                           "--min-length", "2"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "custom gradients" not in proc.stderr  # left out of the export on purpose: not news to a user
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(line["tokens"]) >= 2
    attention = np.asarray(line["attention"])
    assert attention.shape == (len(line["tokens"]), backbone.geometry.positions)
    np.testing.assert_allclose(attention.sum(1), 1.0, atol=1e-4)
    assert [p.suffix for p in plots.iterdir()] == [".png"]


def test_data_of_another_backbone_is_refused_in_one_line(backbone_job, small_data, tmp_path):
    """The default backbone's data (small_data, InceptionV3) with this backbone's job: resuming and
    exporting both refuse, naming both encoders, before any work."""
    backbone, _, job = backbone_job
    want = f"trained on features of {backbone.name} (random weights, seed 1), and --data {small_data} holds " \
           "features of inception_v3 (random weights, seed 1)"
    with pytest.raises(metadata.MetadataError, match=want.replace("(", r"\(").replace(")", r"\)")) as e:
        loop.train(task.parse_args(["--data", small_data, "--job-dir", job, "--units", "32", "--embedding-dim",
                                    "16", "--batch-size", "8", "--epochs", "2", "--no-progress"]))
    assert "\n" not in str(e.value)
    with pytest.raises(metadata.MetadataError, match="use the data it trained on"):
        export.export(job, output=str(tmp_path / "export"), data_dir=small_data)
    assert not (tmp_path / "export").exists()
    # A job from before job.json kept its encoder: the model's own geometry still tells.
    old = str(tmp_path / "old-job")
    shutil.copytree(job, old, ignore=shutil.ignore_patterns(jobdir.EXPORT))
    with open(os.path.join(old, jobdir.JOB_FILE)) as f:
        record = json.load(f)
    del record[jobdir.JOB_ENCODER]
    with open(os.path.join(old, jobdir.JOB_FILE), "w") as f:
        json.dump(record, f)
    g = backbone.geometry
    with pytest.raises(loop.TrainError, match=f"trained on features of {g.positions} positions x {g.channels} "
                                              "channels, and --data .* holds 8x8x2048 features of 299x299 images"):
        loop.train(task.parse_args(["--data", small_data, "--job-dir", old, "--units", "32", "--embedding-dim",
                                    "16", "--batch-size", "8", "--epochs", "2", "--no-progress"]))
    with pytest.raises(export.ExportError, match="8x8x2048 features of 299x299 images \\(inception_v3\\), and "
                                                 f"the model attends over {g.positions} positions"):
        export.export(old, output=str(tmp_path / "export"), data_dir=small_data)
