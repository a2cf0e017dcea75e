"""The SavedModel: loads without this project, captions image bytes and
features the same way the in-process decoder does."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from caption_io import images, metadata, records, tokenizer, vocab
from caption_serving import client
from model import Captioner, CaptionerConfig, backbones, decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter where this project cannot be imported: the
# SavedModel must need TensorFlow alone.
_ISOLATED = r"""
import json, sys
sys.modules.update({m: None for m in ("pipelines", "model", "trainer", "tensorflow_text")})
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
paths = sys.argv[2:]
# The option signature takes every decoding option (caption_io/savedmodel.py), spelt out here.
out = m.signatures["caption_images"](images=tf.constant([open(p, "rb").read() for p in paths]),
                                     beam_size=tf.constant(1), max_length=tf.constant(20),
                                     num_captions=tf.constant(1), no_repeat_ngram=tf.constant(0),
                                     min_length=tf.constant(0), length_alpha=tf.constant(0.7))
print(json.dumps({"captions": [c.decode() for c in out["captions"].numpy()],
                  "tokens": out["tokens"].numpy().tolist(), "signatures": sorted(m.signatures)}))
"""

# The decoding controls through the option signature, in the same kind of fresh interpreter.
_ISOLATED_CONTROLS = r"""
import json, sys
sys.modules.update({m: None for m in ("pipelines", "model", "trainer", "caption_io", "caption_serving",
                                      "tensorflow_text")})
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
images = tf.constant([open(p, "rb").read() for p in sys.argv[2:]])
def run(**opts):
    base = dict(beam_size=3, max_length=20, num_captions=1, no_repeat_ngram=0, min_length=0, length_alpha=0.7)
    base.update(opts)
    out = m.signatures["caption_images"](images=images, **{k: tf.constant(v) for k, v in base.items()})
    return {k: v.numpy().tolist() for k, v in out.items() if k in ("nbest_tokens", "nbest_scores", "nbest_lengths",
                                                                   "tokens", "lengths", "scores")}
print(json.dumps({"plain": run(), "nbest": run(num_captions=3), "no_repeat": run(no_repeat_ngram=1),
                  "min_length": run(min_length=8), "greedy_nbest": run(beam_size=1)}))
"""


def test_the_decoding_controls_work_in_an_isolated_load(each_trained_job, scene_dir):
    paths = _val_images(scene_dir, 3)
    proc = subprocess.run([sys.executable, "-c", _ISOLATED_CONTROLS, os.path.join(each_trained_job, "export"), *paths],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    end = vocab.SPECIALS.index("<end>")
    for i in range(len(paths)):
        # n-best: three captions, best first, distinct, the first the plain beam's caption.
        lengths, scores = got["nbest"]["nbest_lengths"][i], got["nbest"]["nbest_scores"][i]
        seqs = [tuple(t[:n]) for t, n in zip(got["nbest"]["nbest_tokens"][i], lengths) if n > 0]
        assert len(seqs) == 3 and len(set(seqs)) == 3
        assert seqs[0] == tuple(got["plain"]["tokens"][i][:got["plain"]["lengths"][i]])
        assert got["nbest"]["scores"][i] == pytest.approx(got["plain"]["scores"][i], abs=1e-5)
        assert scores[0] >= scores[1] - 1e-4 or lengths[0] != lengths[1]  # sorted by the normalised score
        # no_repeat_ngram 1: no token twice in a caption.
        words = got["no_repeat"]["tokens"][i][:got["no_repeat"]["lengths"][i]]
        assert len(words) == len(set(words)), words
        # min_length 8: <end> not among the first 8 tokens.
        assert end not in got["min_length"]["tokens"][i][:8]
        # Greedy answers one caption in its n-best.
        assert sum(n > 0 for n in got["greedy_nbest"]["nbest_lengths"][i]) == 1


def test_client_defaults_are_decodings():
    # The client's defaults for the controls leave decoding as it was: alpha is decoding's own.
    assert client.CONTROL_DEFAULTS["length_alpha"] == decoding.DEFAULT_ALPHA
    assert client.CONTROL_DEFAULTS["num_captions"] == 1 and client.CONTROL_DEFAULTS["no_repeat_ngram"] == 0


def _val_images(scene_dir, n=4):
    return sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg")))[:n]


def _in_process_greedy(job, paths, max_length=20):
    """Greedy captions from the checkpoint and the data's encoder, without the SavedModel."""
    meta_job = json.load(open(os.path.join(job, "job.json")))
    meta = metadata.read(meta_job["data"])
    tokens = metadata.load_vocab(meta_job["data"], meta)
    config = CaptionerConfig.from_json(open(os.path.join(job, "config.json")).read())
    config = CaptionerConfig.from_dict(dict(config.to_dict(), dropout=0.0))
    model = Captioner(config)
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(os.path.join(job, "checkpoints"))).expect_partial()
    inception = backbones.get(meta.encoder.name)
    encoder = inception.load(os.path.join(meta_job["data"], meta.encoder.file))
    pixels = np.stack([inception.prepare(images.decode(open(p, "rb").read())[None]).numpy()[0] for p in paths])
    out = decoding.greedy(model, encoder(pixels, training=False), max_length)
    return [tokenizer.decode(t, tokens) for t in out.tokens.numpy()], out


def test_savedmodel_captions_without_the_project_like_in_process_greedy(each_trained_job, scene_dir):
    paths = _val_images(scene_dir)
    proc = subprocess.run([sys.executable, "-c", _ISOLATED, os.path.join(each_trained_job, "export"), *paths],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"serving_default", "caption_images", "caption_features"} <= set(got["signatures"])
    want, _ = _in_process_greedy(each_trained_job, paths)
    assert got["captions"] == want
    assert all(c for c in want)  # a trained model says something


def test_saved_model_cli_lists_the_signatures(trained_job):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--all", "--dir", os.path.join(trained_job, "export")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("serving_default", "caption_images", "caption_features", "images", "beam_size", "attention"):
        assert name in proc.stdout


def test_export_of_a_job_trained_with_the_fused_kernels_holds_none_of_them(trained_job):
    # The CPU attention kernels are for training only: the SavedModel must run where they
    # were never built (the isolated test above loads it in a process that has not loaded them).
    with open(os.path.join(trained_job, "metrics.json")) as f:
        if json.load(f)["attention_kernel"] != "fused":
            pytest.skip("this job trained with TensorFlow ops (no C++ compiler here)")
    with open(os.path.join(trained_job, "export", "saved_model.pb"), "rb") as f:
        assert b"SatAdditive" not in f.read()


@pytest.fixture(scope="module")
def loaded(trained_job):
    return tf.saved_model.load(os.path.join(trained_job, "export"))


def test_features_signature_matches_images_signature(loaded, trained_job, scene_dir):
    job = json.load(open(os.path.join(trained_job, "job.json")))
    recs = records.read_records(metadata.shard_files(job["data"], "val"))[:3]
    feats = tf.constant(np.stack([r["features"] for r in recs]).astype(np.float32))
    by_features = loaded.signatures["caption_features"](features=feats, **client.option_inputs(3, 20))
    paths = [os.path.join(scene_dir, "val2014", r["file_name"]) for r in recs]
    by_images = loaded.signatures["caption_images"](images=tf.constant([open(p, "rb").read() for p in paths]),
                                                    **client.option_inputs(3, 20))
    # The stored features are float16 and PIL decodes the JPEG where serving uses TF: the
    # captions agree; scores within the float16 rounding of the features.
    assert by_features["captions"].numpy().tolist() == by_images["captions"].numpy().tolist()
    np.testing.assert_allclose(by_features["scores"].numpy(), by_images["scores"].numpy(), atol=0.05)


def test_beam_one_is_greedy_and_attention_rows_sum_to_one(loaded, trained_job, scene_dir):
    paths = _val_images(scene_dir, 3)
    blobs = tf.constant([open(p, "rb").read() for p in paths])
    one = loaded.signatures["caption_images"](images=blobs, **client.option_inputs(1, 20))
    _, greedy = _in_process_greedy(trained_job, paths)
    np.testing.assert_array_equal(one["tokens"].numpy(), greedy.tokens.numpy())
    np.testing.assert_allclose(one["scores"].numpy(), greedy.scores.numpy(), rtol=1e-4, atol=1e-4)
    for out in (one, loaded.signatures["serving_default"](images=blobs)):
        att, lengths = out["attention"].numpy(), out["lengths"].numpy()
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(att[i, :n].sum(-1), 1.0, atol=1e-4)
            assert np.all(att[i, n:] == 0)


def test_export_refuses_a_job_without_checkpoints(tmp_path, trained_job):
    (tmp_path / "config.json").write_text(open(os.path.join(trained_job, "config.json")).read())
    (tmp_path / "job.json").write_text(open(os.path.join(trained_job, "job.json")).read())
    proc = subprocess.run([sys.executable, "-m", "caption_serving.export", "--job-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no checkpoint" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


def test_serving_decoder_gives_the_pipelines_pixels(scene_dir, tmp_path):
    from PIL import Image

    jpg = _val_images(scene_dir, 1)[0]
    png = str(tmp_path / "x.png")
    Image.open(jpg).save(png)
    for path in (jpg, png):
        blob = open(path, "rb").read()
        np.testing.assert_array_equal(backbones.decode(tf.constant(blob)).numpy(), images.decode(blob))
