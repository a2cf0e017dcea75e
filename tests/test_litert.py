"""The LiteRT captioner (caption_serving/litert.py, litert_runner.py): builtin ops only with its
weights inside, the SavedModel's captions on the demo's images, and `caption --model X.tflite`."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from caption_io import images, vocab
from caption_serving import caption, client, litert, litert_int8, litert_runner
from pipelines import synthetic
from tests.conftest import exit_code

# How often a file's best caption must equal the SavedModel's: float32 beam search, and the
# float16 and int8 files (greedy and beam search).
BEAM_AGREEMENT = 0.98
QUANTIZED_AGREEMENT = 0.9
# The tests' job is trained for seconds and many of its captions are near-ties, which a file's
# rounding (and the CPU's: the job is trained where the suite runs) may tip either way. A greedy
# caption that leaves the SavedModel's where the float32 model prefers the SavedModel's token by
# less than this many nats (measured: at most 0.018 on a Zen 4 EPYC) is such a tie, not an error.
NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def export_dir(trained_job):
    return os.path.join(trained_job, "export")


@pytest.fixture(scope="module")
def demo_images(scene_dir):
    """The demo's val images, then its training images: 19 in all."""
    paths = [p for split in ("val2014", "train2014")
             for p in sorted(glob.glob(os.path.join(scene_dir, split, "*.jpg")))]
    assert len(paths) >= 10
    return paths


@pytest.fixture(scope="module")
def max_length(export_dir):
    return client.export_info(export_dir)["default_max_length"]


@pytest.fixture(scope="module")
def parts(export_dir):
    return litert.load_export(export_dir)


@pytest.fixture(scope="module")
def loaded(export_dir):
    return client.load_model(export_dir)[0]


@pytest.fixture(scope="module")
def savedmodel(loaded, demo_images, max_length):
    """The SavedModel's raw outputs for the demo images, per beam size (beam 3 with its 3 best)."""
    blobs = tf.constant([open(p, "rb").read() for p in demo_images])

    def run(beam_size):
        out = loaded.signatures["caption_images"](
            images=blobs, **client.option_inputs(beam_size, max_length, num_captions=beam_size))
        return {k: v.numpy() for k, v in out.items()}
    return {1: run(1), 3: run(3)}


@pytest.fixture(scope="module")
def files(parts, export_dir, max_length, tmp_path_factory):
    """Converted files by name: greedy and beam-3, float32 (each with its .json beside it)."""
    folder = tmp_path_factory.mktemp("litert")
    made = {}
    for name, beam in (("greedy", 1), ("beam3", 3)):
        made[name] = str(folder / f"{name}.tflite")
        litert.write(parts, export_dir, made[name], beam, max_length)
    return made


def litert_outputs(path, demo_images):
    runner, _ = litert_runner.load(path)
    return [runner.run(images.decode(open(p, "rb").read())) for p in demo_images]


def agreement(outputs, reference) -> tuple[float, list[bool]]:
    """How often the file's best caption is the SavedModel's, token for token."""
    same = []
    for i, out in enumerate(outputs):
        n = reference["lengths"][i]
        same.append(bool(out["lengths"][0] == n and (out["tokens"][0][:n] == reference["tokens"][i][:n]).all()))
    return sum(same) / len(same), same


def quantized_agreement(parts, paths, outputs, reference, beam: int) -> tuple[float, list]:
    """The share of images a quantized file captions as the SavedModel does, a near-tie counted as
    the same: greedy, a split at a step the float32 model nearly ties (NEAR_TIE); beam search, a
    best caption that is among the SavedModel's own 3 best (the same hypotheses, ranked
    differently). -> (share, per image: None where the same, else the split's gap or the rank's)."""
    gaps = split_gaps(parts, paths, outputs, reference) if beam == 1 else runner_up_gaps(outputs, reference)
    agrees = [g is None or (g < NEAR_TIE if beam == 1 else np.isfinite(g)) for g in gaps]
    return sum(agrees) / len(agrees), gaps


def runner_up_gaps(outputs, reference) -> list[float | None]:
    """Beam search, per image whose file's best caption is another than the SavedModel's: how far
    below the SavedModel's best it ranks that caption among its own 3 best (its normalised score),
    or infinity where it is not among them (None: the same caption)."""
    gaps = []
    for out, tokens, lengths, scores in zip(outputs, reference["nbest_tokens"], reference["nbest_lengths"],
                                            reference["nbest_scores"]):
        got = list(out["tokens"][0][:out["lengths"][0]])
        ranks = [k for k in range(len(lengths)) if list(tokens[k][:lengths[k]]) == got]
        gaps.append(None if ranks and ranks[0] == 0 else float(scores[0] - scores[ranks[0]]) if ranks else np.inf)
    return gaps


def split_gaps(parts, paths, outputs, reference) -> list[float | None]:
    """Per image, where the file's best caption first leaves the SavedModel's: how much more
    log-probability the float32 model gives the SavedModel's token there than the file's, given the
    words before (None: the same caption). A near-tie, where rounding may pick either, is small."""
    gaps = []
    for path, out, ref_tokens, n in zip(paths, outputs, reference["tokens"], reference["lengths"]):
        ref, got = list(ref_tokens[:n]), list(out["tokens"][0][:out["lengths"][0]])
        if ref == got:
            gaps.append(None)
            continue
        t = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        mine = ref[t] if t < len(ref) else vocab.END_ID   # a caption that stops there ends in <end>
        theirs = got[t] if t < len(got) else vocab.END_ID
        features = parts.encoder(parts.backbone.prepare(images.decode(open(path, "rb").read())[None]))
        logits, _ = parts.captioner.teacher_forced(features, tf.constant([[vocab.START_ID, *ref[:t], mine]]))
        logp = tf.nn.log_softmax(logits[0, t])
        gaps.append(float(logp[mine] - logp[theirs]))
    return gaps


# ------------------------------------------------------------------------------------ the file
def test_the_file_holds_builtin_ops_only_and_its_weights(files, export_dir, max_length):
    with open(files["greedy"], "rb") as f:
        data = f.read()
    ops = litert_runner.operator_names(data)
    assert litert_runner.non_builtin_ops(data) == [] and not any(op.startswith("CUSTOM") for op in ops)
    assert {"CONV_2D", "WHILE", "RESIZE_BILINEAR", "TOPK_V2"} <= set(ops), ops
    assert "VAR_HANDLE" not in ops and "READ_VARIABLE" not in ops  # weights are constants, not variables
    weights = sum(os.path.getsize(p) for p in glob.glob(os.path.join(export_dir, "variables", "variables.data*")))
    assert len(data) > 0.95 * weights
    beside = json.load(open(litert_runner.sidecar_path(files["greedy"])))
    assert beside["beam_size"] == 1 and beside["max_length"] == max_length
    assert beside["tokens"][:2] == ["<pad>", "<unk>"]


def test_greedy_captions_equal_the_savedmodels_on_every_image(files, demo_images, savedmodel, max_length):
    outputs = litert_outputs(files["greedy"], demo_images)
    ref = savedmodel[1]
    assert agreement(outputs, ref) == (1.0, [True] * len(demo_images))
    for i, out in enumerate(outputs):
        n = ref["lengths"][i]
        assert out["tokens"].shape == (1, max_length) and (out["tokens"][0][n:] == 0).all()
        assert out["scores"][0] == pytest.approx(ref["scores"][i], abs=1e-3)
        assert np.abs(out["attention"][0][:n] - ref["attention"][i][:n]).max() < 1e-4


def test_beam_search_agrees_with_the_savedmodels(files, demo_images, savedmodel, max_length):
    outputs = litert_outputs(files["beam3"], demo_images)
    share, same = agreement(outputs, savedmodel[3])
    print(f"beam-3 agreement: {sum(same)}/{len(same)}")
    assert share >= BEAM_AGREEMENT, same
    for out in outputs:  # the beam, best first by normalised score: three distinct hypotheses
        seqs = {tuple(t[:n]) for t, n in zip(out["tokens"], out["lengths"])}
        assert out["tokens"].shape == (3, max_length) and len(seqs) == 3


def test_quantized_files_are_smaller_and_agree(parts, export_dir, demo_images, savedmodel, max_length, tmp_path):
    float32 = os.path.getsize(os.path.join(export_dir, "variables", "variables.data-00000-of-00001"))
    path = str(tmp_path / "fp16.tflite")
    size, _ = litert.write(parts, export_dir, path, 1, max_length, litert.FLOAT16)
    outputs = litert_outputs(path, demo_images)
    _, same = agreement(outputs, savedmodel[1])
    share, gaps = quantized_agreement(parts, demo_images, outputs, savedmodel[1], 1)
    print(f"float16: {size / 1e6:.1f} MB ({size / float32:.2f} of the float32 weights), "
          f"greedy agreement {sum(same)}/{len(same)}, with near-ties {share:.3f}: {gaps}")
    assert size < 0.55 * float32
    assert share >= QUANTIZED_AGREEMENT, gaps


def test_int8_files_are_a_quarter_and_agree(parts, export_dir, demo_images, savedmodel, max_length, tmp_path):
    """Calibrated on other scenes than the ones it is checked on (the demo's are its training
    and val images); the beam-3 file reuses the greedy file's calibration."""
    other = str(tmp_path / "other")
    synthetic.generate(other, n_train=litert_int8.CALIBRATION_IMAGES, n_val=0, seed=11)
    calibration = litert.calibration_images([os.path.join(other, "train2014")])
    float32 = os.path.getsize(os.path.join(export_dir, "variables", "variables.data-00000-of-00001"))
    for beam in (1, 3):
        path = str(tmp_path / f"int8-beam{beam}.tflite")
        size, _ = litert.write(parts, export_dir, path, beam, max_length, litert.INT8, calibration)
        with open(path, "rb") as f:
            data = f.read()
        assert litert_runner.non_builtin_ops(data) == [] and "DEQUANTIZE" in litert_runner.operator_names(data)
        outputs = litert_outputs(path, demo_images)
        _, same = agreement(outputs, savedmodel[beam])
        share, gaps = quantized_agreement(parts, demo_images, outputs, savedmodel[beam], beam)
        print(f"int8 beam {beam}: {size / 1e6:.1f} MB ({size / float32:.2f} of the float32 weights), "
              f"agreement {sum(same)}/{len(same)}, with near-ties {share:.3f}: {gaps}")
        assert size < 0.3 * float32
        assert share >= QUANTIZED_AGREEMENT, gaps


# ----------------------------------------------------------------------------- the command
def test_caption_command_on_a_tflite_file(files, loaded, demo_images, savedmodel, max_length, tmp_path, capsys):
    paths = demo_images[:2]
    assert caption.main([*paths, "--model", files["beam3"], "--json", "--num-captions", "2",
                         "--plot", str(tmp_path / "plots")]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = client.caption_batch(loaded, [open(p, "rb").read() for p in paths], 3, max_length, num_captions=2)
    for g, w in zip(got, want):
        assert g["caption"] == w["caption"] and g["tokens"] == w["words"]
        assert np.allclose(g["attention"], w["attention"], atol=1e-4)
        assert [c["caption"] for c in g["captions"]] == [n["caption"] for n in w["nbest"]]
    assert len(os.listdir(tmp_path / "plots")) == 2
    assert caption.main([paths[0], "--model", files["greedy"]]) == 0  # the file's own beam size by default
    assert capsys.readouterr().out == savedmodel[1]["captions"][0].decode() + "\n"


def test_options_the_file_cannot_honour_are_one_line_errors(files, demo_images, capsys):
    for flags, words in ((["--beam-size", "2"], "searches with 3 beam"), (["--max-length", "10"], "tokens (fixed"),
                         (["--no-repeat-ngram", "2"], "cannot apply no_repeat_ngram")):
        assert caption.main([demo_images[0], "--model", files["beam3"], *flags]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --model {files['beam3']}: ") and words in line


def test_bad_inputs_are_one_line_errors(files, demo_images, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    assert caption.main([str(text), demo_images[0], "--model", files["greedy"]]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert err.strip().splitlines() == [f"error: {text}: not an image (unrecognised format)"]

    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\0" * 64)
    foreign = tmp_path / "foreign.tflite"
    foreign.write_bytes(_small_model())
    alone = tmp_path / "alone.tflite"
    alone.write_bytes(open(files["greedy"], "rb").read())
    for path, words in ((junk, "not a LiteRT model"), (foreign, "not a captioner"), (alone, "no vocabulary beside it")):
        if path != alone:
            with open(litert_runner.sidecar_path(str(path)), "w") as f:
                json.dump(json.load(open(litert_runner.sidecar_path(files["greedy"]))), f)
        assert caption.main([demo_images[0], "--model", str(path)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --model {path}: ") and words in line, line


def _small_model() -> bytes:
    """A valid LiteRT file that is not a captioner."""
    fn = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([2], tf.float32, name="x")])
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn).convert()


def test_converter_refuses_bad_arguments_in_one_line(export_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    moved = tmp_path / "moved"  # an export without its data directory, where the vocabulary is
    shutil.copytree(export_dir, moved, ignore=shutil.ignore_patterns("variables"))
    info = json.loads((moved / "assets.extra" / "export.json").read_text())
    (moved / "assets.extra" / "export.json").write_text(json.dumps(dict(info, data="/nowhere", data_relative=None)))
    out = str(tmp_path / "a.tflite")
    for argv, words in ((["--model", str(empty), "--output", out], "not a SavedModel"),
                        (["--model", str(empty), "--output", str(tmp_path / "a.bin")], "name it *.tflite"),
                        (["--model", str(moved), "--output", out], "pass --data DATA_DIR"),
                        (["--model", str(empty), "--output", out, "--quantize", "int8"], "needs --calibration-images"),
                        (["--model", str(empty), "--output", out, "--quantize", "int8", "--calibration-images",
                          str(empty)], "no .jpg")):
        assert exit_code(litert.main, argv) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and words in line, line
