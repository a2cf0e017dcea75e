"""Train-to-learn: the scene set through the pipeline, a few CPU-minutes of
training, and the captions of held-out images name what is in them."""
from __future__ import annotations

import collections
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from caption_io import metadata, records
from caption_serving import client, export
from pipelines import preprocess, synthetic
from trainer import loop, task

# The bars. The GRU (--units 256, 5 epochs; preprocessing is most of the test's time): first object
# right 0.700, exact one-object 0.727; six epochs reached 0.720 and 0.773 (val cross-entropy 0.69
# after the first epoch, 0.37 after the sixth; 2- and 3-object scenes 0.361 and 0.050), seven
# 0.760 and 0.773.
# The Transformer (--units 256, two heads, 4 epochs at lambda 0.1, which on these empty backgrounds
# lets a word's attention stay on its object): val cross-entropy 0.48 after the first epoch; first
# object right 0.750, exact one-object 0.773 (2- and 3-object scenes 0.444 and 0.200); three
# epochs reached only 0.640 and 0.636.
TRANSFORMER = ["--epochs", "4", "--attention-reg", "0.1"]
VAL_XENT_SHARE = 0.25     # val cross-entropy ends below this share of where it started
FIRST_RIGHT = 0.6         # share of val images whose caption's first (colour, shape) is in the picture
EXACT_SINGLE = 0.6        # share of one-object val images whose caption names exactly that object


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """1,000 training scenes through the pipeline (most of this file's time), for each decoder."""
    work = tmp_path_factory.mktemp("learn")
    coco, data_dir = str(work / "coco"), str(work / "data")
    synthetic.generate(coco, n_train=1000, n_val=100, seed=11)
    preprocess.run(["--coco-dir", coco, "--output", data_dir, "--encoder-weights", "random", "--seed", "0",
                    "--num-shards", "train=4,val=1"])
    return coco, data_dir


@pytest.mark.slow
@pytest.mark.parametrize("decoder, flags", [("gru", ["--epochs", "5"]), ("transformer", TRANSFORMER)])
def test_captioner_learns_the_scene_set(decoder, flags, scenes, tmp_path):
    coco, data_dir = scenes
    job = str(tmp_path / "job")
    # The per-epoch caption metrics have their own tests (test_epoch_metrics); here they would only
    # add their time to the suite's slowest test.
    metrics = loop.train(task.parse_args(["--data", data_dir, "--job-dir", job, "--units", "256", "--decoder", decoder,
                                          *flags, "--batch-size", "64", "--no-progress", "--eval-images", "0"]))
    assert metrics["final_val_loss"] < metrics["initial_val_loss"]
    assert metrics["history"][-1]["val_xent"] < VAL_XENT_SHARE * metrics["initial_val_xent"], metrics["history"]

    # The export's module, called in this process: its SavedModel captions as it does (test_export),
    # and saving and loading one would add half a minute a decoder here.
    module, _ = export.build_module(job)
    recs = records.read_records(metadata.shard_files(data_dir, "val"))
    feats = tf.constant(np.stack([r["features"] for r in recs]).astype(np.float32))
    out = module.caption_features(features=feats, **client.option_inputs(1, 30))
    objects = synthetic.scene_objects(os.path.join(coco, "annotations", "instances_val2014.json"))
    first_right, exact = [], collections.defaultdict(list)
    for rec, caption in zip(recs, out["captions"].numpy()):
        caption = caption.decode()
        truth = {(o["colour"], o["shape"]) for o in objects[rec["image_id"]]}
        words = re.findall(r"[a-z]+", caption)
        first = next(((a, b) for a, b in zip(words, words[1:]) if a in synthetic.COLOURS and b in synthetic.SHAPES),
                     None)
        first_right.append(first in truth)
        exact[len(truth)].append(synthetic.objects_in_caption(caption) == truth)
    summary = {n: round(float(np.mean(v)), 3) for n, v in sorted(exact.items())}
    # Multi-object scenes are reported, not held to a bar: they are where captioners fail.
    print(f"first object right {np.mean(first_right):.3f}; exact set by object count {summary}")
    assert np.mean(first_right) >= FIRST_RIGHT, (np.mean(first_right), summary)
    assert np.mean(exact[1]) >= EXACT_SINGLE, summary
