"""Captions in Chinese, end to end: the scene set written in Chinese, through the pipeline (its
default words mode, where a Chinese character is a word), the trainer with its evaluation, the
export and the `caption` command. Whether a Chinese captioner learns as well as an English one
at the same settings is benchmarks/languages.py's to measure (docs/benchmarks.md)."""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from caption_eval import evaluate
from caption_io import cjk, metadata, records, savedmodel, tokenizer, vocab
from caption_serving import caption, client
from pipelines import preprocess, synthetic
from tests.conftest import N_TRAIN, N_VAL, train_small_job

ONLY_CJK = re.compile(f"{cjk.PYTHON.pattern}+")


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    """The small scene set in Chinese (the same pictures as the English one), preprocessed,
    trained like the shared small job, evaluated by the trainer and exported."""
    work = tmp_path_factory.mktemp("zh")
    coco, data = str(work / "coco"), str(work / "data")
    synthetic.generate(coco, n_train=N_TRAIN, n_val=N_VAL, seed=3, language="zh")
    # MobileNetV3: the cheapest encoder to build and run; the language is what is tested here.
    preprocess.run(["--coco-dir", coco, "--output", data, "--encoder", "mobilenet_v3_large",
                    "--encoder-weights", "random", "--seed", "1", "--num-shards", "1"])
    job = train_small_job(data, str(tmp_path_factory.mktemp("job")))
    return coco, data, job


def test_a_chinese_vocabulary_is_characters(chinese):
    _, data, _ = chinese
    meta = metadata.read(data)
    tokens = metadata.load_vocab(data, meta)
    assert meta.vocab.tokenizer == "words"
    assert all(len(t) == 1 and cjk.is_cjk(t) for t in tokens[vocab.FIRST_WORD_ID:])
    recs = records.read_records(metadata.shard_files(data, "train", meta))
    # A caption of 12 characters is 12 tokens between <start> and <end>, written back without spaces.
    for rec in recs[:3]:
        for ids, raw in zip(rec["captions"], rec["caption_text"]):
            written = tokenizer.decode(ids[1:], tokens)
            assert written == re.sub(r"[\s。，、：]", "", raw) and len(ids) == len(written) + 2


def test_the_export_writes_chinese_without_spaces_and_labels_each_character(chinese):
    coco, data, job = chinese
    loaded, _ = client.load_model(os.path.join(job, "export"))
    blobs = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(coco, "val2014", "*")))]
    out = {k: v.numpy() for k, v in loaded.signatures[savedmodel.CAPTION_IMAGES](
        images=tf.constant(blobs), **client.option_inputs(3, 20, num_captions=2)).items()}
    tokens = metadata.load_vocab(data, metadata.read(data))
    for names in (savedmodel.BEST, savedmodel.NBEST):
        steps = out[names.tokens].shape[-1]
        for text, ids, labels in zip(out[names.captions].reshape(-1), out[names.tokens].reshape(-1, steps),
                                     out[names.token_text].reshape(-1, steps)):
            text = text.decode("utf-8")
            assert text == tokenizer.decode(ids, tokens)  # the graph's rule is Python's
            assert not text or ONLY_CJK.fullmatch(text), text  # characters, no space between them
            words = [w.decode("utf-8") for w, keep in zip(labels, vocab.is_word(ids)) if keep]
            assert "".join(words) == text and all(len(w) == 1 for w in words)
    rows = client.rows(out)
    assert [r["words"] for r in rows] == [list(r["caption"]) for r in rows]


def test_caption_prints_chinese_and_plots_a_panel_per_character(chinese, tmp_path, capsys):
    coco, _, job = chinese
    image = sorted(glob.glob(os.path.join(coco, "val2014", "*")))[0]
    plots = str(tmp_path / "plots")
    assert caption.main([image, "--model", os.path.join(job, "export"), "--json", "--plot", plots]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ONLY_CJK.fullmatch(line["caption"]) and line["tokens"] == list(line["caption"])
    assert np.asarray(line["attention"]).shape[0] == len(line["caption"])
    assert len(glob.glob(os.path.join(plots, "*.png"))) == 1


def test_the_evaluation_scores_chinese_by_characters_and_reads_its_objects(chinese, tmp_path):
    _, data, job = chinese
    out = str(tmp_path / "eval")
    m = evaluate.evaluate(os.path.join(job, "export"), data, beam_size=1, gallery_size=0, output=out)
    # Exact objects are read from Chinese captions (the scene evaluators know its words). The COCO
    # metrics score characters: scored as space-separated words, a Chinese caption would be one
    # "word" that matches no reference unless it equals one, and BLEU-1 would be 0.
    assert m["exact_objects"]["all"]["images"] == N_VAL
    assert all(np.isfinite(m[k]) for k in ("BLEU-4", "CIDEr", "ROUGE-L"))
    assert m["BLEU-1"] > 0.1, m
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert all(not r["caption"] or ONLY_CJK.fullmatch(r["caption"]) for r in results)
