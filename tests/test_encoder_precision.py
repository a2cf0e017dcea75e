"""--encoder-precision (model/precision.py): auto decided by a measurement the tests inject (never
by this CPU's speed), bfloat16 features close to float32's, float32 features exactly the encoder's
own call's output, the choice recorded in metadata.json and export.json and part of a shard's
fingerprint, an export re-encoded at load in the loader's choice, bad values refused in one
line naming the flag.

The suite makes its data and exports in float32 on every machine (tests/conftest.py pins
CAPTIONER_ENCODER_PRECISION); the tests here ask for each precision by name or inject auto's probe.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.utils import shared

from caption_io import datadir, jobdir, metadata, records, savedmodel, text
from caption_serving import client, export, reencode
from model import backbones, precision
from pipelines import caption_images, preprocess, shards
from pipelines.transforms import check, encode
from tests.conftest import exit_code


def _probe(speedup):
    return lambda: precision.Probe(speedup, "CPU", 0.0)


def _never():
    raise AssertionError("a named precision is not measured")


def _cosines(a, b) -> np.ndarray:
    a, b = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("speedup, picked", [(0.0, "float32"), (0.55, "float32"), (1.49, "float32"),
                                             (1.5, "bfloat16"), (3.9, "bfloat16")])
def test_auto_picks_bfloat16_only_where_the_probe_measures_it_clearly_faster(speedup, picked):
    choice = precision.choose("auto", _probe(speedup))
    assert (choice.precision, choice.speedup) == (picked, speedup)
    assert f"{speedup:.2f}x" in choice.describe()


@pytest.mark.parametrize("own, picked", [(1.49, "float32"), (0.87, "float32"), (1.5, "bfloat16"), (2.4, "bfloat16")])
def test_where_the_probe_passes_the_encoder_itself_decides(own, picked):
    """A probe of 1.66x with the encoder itself at 0.87x is what MobileNetV3 measured on a Zen 4 EPYC."""
    choice = precision.choose("auto", _probe(1.66), work_speedup=lambda: own)
    assert (choice.precision, choice.speedup) == (picked, own)
    assert f"the encoder itself measured {own:.2f}x" in choice.why and "probe: 1.66x" in choice.why


def test_the_encoder_is_not_timed_where_the_probe_fails_or_a_precision_is_named():
    """Emulated bfloat16 probes at 0.92-0.95x (Zen 2): under PROBE_MARGIN, nothing more is timed."""
    for asked, probe in (("auto", _probe(1.24)), ("auto", _probe(0.95)), ("auto", _probe(0.0)),
                         ("bfloat16", _never), ("float32", _never)):
        choice = precision.choose(asked, probe, work_speedup=_never)
        assert choice.precision == ("float32" if asked == "auto" else asked)
    assert "the encoder itself was not timed" in precision.choose("auto", _probe(1.24), work_speedup=_never).why


def test_a_probe_between_its_bar_and_the_margin_has_the_encoder_timed():
    """Zen 4's probe measured 1.56-1.68x, near MARGIN: the encoder's own speed decides from PROBE_MARGIN up."""
    assert precision.choose("auto", _probe(1.3), work_speedup=lambda: 1.7).precision == "bfloat16"
    assert precision.choose("auto", _probe(1.3), work_speedup=lambda: 1.2).precision == "float32"
    assert precision.choose("auto", _probe(1.3)).precision == "float32"  # the probe alone: MARGIN


def test_time_encoder_runs_both_precisions_and_leaves_the_layers_as_they_were():
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Reshape((256, 8))(x))
    speedup = precision.time_encoder(model, batch=2, rounds=1)
    assert np.isfinite(speedup) and speedup > 0
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    precision.set_compute(model, "bfloat16")
    precision.time_encoder(model, batch=2, rounds=1)
    assert {layer.compute_dtype for layer in model.layers} == {"bfloat16"}  # what it was before, again


def test_in_turns_reverses_the_order_every_other_round_and_takes_medians(monkeypatch):
    """The timing under auto's measurements (the probe, the encoder, the trainer's step): neither
    precision always runs first, and one slow call does not move the figure."""
    clock, order = [0.0], []
    costs = {"float32": iter([1.0, 5.0, 2.0]), "bfloat16": iter([4.0, 3.0, 90.0])}
    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])

    def call(name):
        order.append(name)
        clock[0] += next(costs[name])

    seconds = precision.in_turns({name: (lambda name=name: call(name)) for name in costs}, rounds=3)
    assert order == ["float32", "bfloat16", "bfloat16", "float32", "float32", "bfloat16"]
    assert seconds == {"float32": 2.0, "bfloat16": 4.0}


def test_preprocessing_auto_times_its_own_encoder(scene_dir, tmp_path, monkeypatch):
    """The pipeline's auto, where the probe passes (injected), times the encoder it has just built
    (injected: 1.2x) and keeps float32; the plan it hands the workers says so."""
    monkeypatch.setattr(precision, "measure", _probe(3.0))
    timed = []
    monkeypatch.setattr(precision, "time_encoder",
                        lambda model, **_: timed.append((model.name, model.input_shape[1])) or 1.2)
    argv = ["--coco-dir", scene_dir, "--output", str(tmp_path / "data"), "--encoder", "mobilenet_v3_large",
            "--encoder-weights", "random", "--encoder-precision", "auto"]
    args, _ = preprocess.parse_args(argv)
    args.argv = argv
    opts = preprocess.prepare(args)
    assert timed == [("mobilenet_v3_large_features", 224)]
    assert opts["encoder_precision"] == opts["static"].encoder.precision == "float32"


def test_a_named_precision_or_an_unmeasurable_machine_is_not_measured():
    assert precision.choose("bfloat16", _never).precision == "bfloat16"
    assert precision.choose("float32", _never).precision == "float32"
    remote = precision.choose("auto", _never, measurable=False)
    assert remote.precision == "float32" and "--encoder-precision bfloat16" in remote.why
    # The real probe runs here and says what it found (its figure is this machine's, not asserted).
    found = precision.measure()
    assert found.device in ("CPU", "GPU") and np.isfinite(found.speedup) and found.speedup >= 0


def test_bad_values_are_refused_in_one_line_naming_the_flag(capsys, clean_logging, tmp_path, monkeypatch):
    commands = [(preprocess.main, ["--coco-dir", "/tmp", "--output", "X"]),
                (caption_images.main, ["--images", "/tmp", "--model", "M", "--output", "O"]),
                (export.main, ["--job-dir", "J"])]
    for main, argv in commands:
        assert exit_code(main, [*argv, "--encoder-precision", "float16"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: argument --encoder-precision: invalid choice"), err
    with pytest.raises(precision.PrecisionError, match=r"^--encoder-precision 'fp16': choose one of auto, "):
        export.build_module(str(tmp_path), encoder_precision="fp16")  # before anything is read
    monkeypatch.setenv(precision.ENV, "half")
    assert exit_code(preprocess.main, ["--coco-dir", "/tmp", "--output", "X"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: CAPTIONER_ENCODER_PRECISION (--encoder-precision's default) 'half': choose one of auto, float32, "
        "bfloat16"]


def test_the_shard_fingerprint_holds_the_precision():
    entries = [{"image_id": 1, "file_name": "a.jpg", "path": "/a.jpg", "captions": [{"text": "a", "words": ["a"]}]}]
    args = (entries, ["<pad>", "a"], "words", "f" * 64)
    assert shards.fingerprint(*args, "float32") == shards.fingerprint(*args)  # float32's shards as they were
    assert shards.fingerprint(*args, "bfloat16") != shards.fingerprint(*args, "float32")


def test_metadata_records_the_precision_and_an_older_file_reads_as_float32(small_data):
    with open(os.path.join(small_data, datadir.METADATA_FILE)) as f:
        raw = json.load(f)
    assert raw["encoder"]["precision"] == "float32"  # the suite's pinned choice, written by the pipeline
    del raw["encoder"]["precision"]
    old = metadata.Metadata.from_dict(raw)
    assert (old.encoder.precision, old.encoder.computed_in) == (None, "float32")
    assert old.to_dict() == raw  # read and written again unchanged


def _val(small_data) -> tuple[list[dict], list[str]]:
    """small_data's val entries as its encode pass had them (the manifest's, captions tokenised)
    and its vocabulary."""
    with open(os.path.join(small_data, datadir.manifest("val"))) as f:
        entries = sorted((json.loads(line) for line in f), key=lambda e: e["image_id"])
    words = iter(text.words([c["text"] for e in entries for c in e["captions"]]))
    for e in entries:
        e["captions"] = [dict(c, words=next(words)) for c in e["captions"]]
    return entries, metadata.load_vocab(small_data, metadata.read(small_data))


def test_the_pipelines_features_in_each_precision(small_data, tmp_path):
    """small_data's val shard, written by the pipeline in float32 (the suite's pinned choice), holds
    exactly what the encoder's own call, `model(x, training=False)`, makes of the shard's batch, to
    the byte. The shard writer asked for bfloat16 with the same inputs does
    not keep that shard, writes features within 0.999 cosine of it per image (InceptionV3, random
    weights), and metadata.json's plan says bfloat16."""
    meta = metadata.read(small_data)
    entries, tokens = _val(small_data)
    name = datadir.shard_name("val", 0, 1)
    f32 = records.read_records([os.path.join(small_data, name)], meta.geometry.feature_shape)
    inception, encoder_path = backbones.of_encoder(meta.encoder.to_dict()), os.path.join(small_data, meta.encoder.file)
    model = inception.load(encoder_path)
    size = inception.geometry.input_size
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    pixels = np.stack([inception.prepare(check.read_pixels(e)[0][None]).numpy()[0] for e in entries])
    assert len(entries) < 16 and [r["image_id"] for r in f32] == [e["image_id"] for e in entries]  # one batch
    assert np.stack([r["features"] for r in f32]).tobytes() == call(pixels).numpy().astype(np.float16).tobytes()

    digest = backbones.weights_sha256(model)
    finished = shards.read_done(small_data, name, shards.fingerprint(entries, tokens, meta.vocab.tokenizer, digest))
    assert finished is not None  # these are the inputs that shard was finished from
    out = str(tmp_path / "data")
    os.makedirs(os.path.join(out, shards.DONE_DIR))
    shutil.copy(os.path.join(small_data, name), out)
    shutil.copy(shards.done_path(small_data, name), os.path.join(out, shards.DONE_DIR))
    fn = encode.EncodeShard(out, {"val": 1}, meta.vocab.tokenizer, meta.encoder.name, encoder_path, digest,
                            shared.Shared(), batch_size=16, total_images=len(entries), precision="bfloat16")
    fn.setup()
    list(fn.process((("val", 0), entries), tokens))
    assert shards.read_done(out, name, finished["fingerprint"]) is None  # written again, not kept
    bf16 = records.read_records([os.path.join(out, name)], meta.geometry.feature_shape)
    cosines = _cosines([r["features"] for r in bf16], [r["features"] for r in f32])
    assert cosines.min() >= 0.999, cosines

    argv = ["--coco-dir", "/tmp", "--output", out, "--encoder-weights", "random", "--encoder-precision", "bfloat16"]
    args, _ = preprocess.parse_args(argv)
    args.argv = argv
    planned = preprocess._static_metadata(args, {"kind": "coco", "path": "/tmp"}, None, encoder_path, {}, "bfloat16")
    assert planned.encoder.precision == "bfloat16"


def test_the_export_encodes_in_its_choice_and_a_loader_may_choose_another(trained_job, small_data, scene_dir,
                                                                          monkeypatch):
    """Export: auto is measured when it is made (injected: the probe and then the export's own
    encoder, bfloat16 3x and 2.5x as fast) -> the image signatures' encoder computes in bfloat16 and
    export.json says so; where the encoder itself gains too little, float32. Load: the job's float32
    export is kept where the loader's probe finds bfloat16 no faster; where it does, the images are
    encoded in bfloat16 with the export's own weights, within 0.999 cosine per image of the float32
    features the job trained on, and captioned as the export's caption_features captions them."""
    monkeypatch.setattr(precision, "measure", _probe(3.0))
    timed = []

    def encoder_speedup(model, **_):
        timed.append((model.name, model.input_shape[1]))
        return 2.5 if len(timed) != 2 else 1.1

    monkeypatch.setattr(precision, "time_encoder", encoder_speedup)
    module, info = export.build_module(trained_job, encoder_precision="auto")
    choice = info[savedmodel.INFO_ENCODER_PRECISION]
    assert (choice["asked"], choice["precision"], choice["speedup"]) == ("auto", "bfloat16", 2.5)
    assert timed == [("inception_v3_features", 299)]  # the export's own encoder, at its input size
    assert {layer.compute_dtype for layer in module.encoder.layers} == {"bfloat16"}
    module, info = export.build_module(trained_job, encoder_precision="auto")
    assert info[savedmodel.INFO_ENCODER_PRECISION]["precision"] == "float32"
    assert {layer.compute_dtype for layer in module.encoder.layers} == {"float32"}

    path = os.path.join(trained_job, jobdir.EXPORT)
    loaded, info = client.load_model(path)
    assert savedmodel.export_encoder_precision(info) == "float32"
    same, choice = reencode.at_precision(loaded, info, path, "auto", _probe(1.2))
    assert same is loaded and choice.precision == "float32"
    captioner, choice = reencode.at_precision(loaded, info, path, "auto", _probe(3.0))
    assert isinstance(captioner, reencode.Reencoded) and choice.precision == "bfloat16"
    f32 = records.read_records(metadata.shard_files(small_data, "val"))[:3]
    blobs = [open(os.path.join(scene_dir, "val2014", r["file_name"]), "rb").read() for r in f32]
    bf16 = captioner.signatures[savedmodel.CAPTION_IMAGES]._encode(tf.constant(blobs))
    assert bf16.dtype == tf.float32
    cosines = _cosines(bf16, [r["features"] for r in f32])
    assert cosines.min() >= 0.999, cosines
    # Captioned as the export captions those features. (Not as it captions its own float32 features:
    # which caption a barely trained model prefers can turn on bfloat16's rounding, and that differs
    # where the CPU has bfloat16 dot products from where TensorFlow emulates them.)
    max_length = savedmodel.export_max_length(info)
    got = client.caption_batch(captioner, blobs, 3, max_length)
    through_features = client.caption_features(loaded, bf16, 3, max_length)
    assert [(r["caption"], r["score"]) for r in got] == [(r["caption"], r["score"]) for r in through_features]
