"""The Beam pipeline on a scene set with faults mixed in."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caption_io import images, metadata, records, text, vocab
from model import backbones
from pipelines import preprocess
from tests.conftest import exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    return preprocess.run(args + ["--encoder-weights", "random", "--seed", "5"])


def _rejects(data_dir):
    out = []
    for path in glob.glob(os.path.join(data_dir, "rejected", "*.jsonl")):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def _records(data_dir, split):
    return records.read_records(sorted(glob.glob(records.shard_glob(data_dir, split))))


@pytest.fixture(scope="module")
def faulty_run(faulty_scene, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    meta = _run(["--coco-dir", faulty_scene["dir"], "--output", out, "--num-shards", "train=3,val=2"])
    return out, metadata.Metadata.from_dict(meta)


def test_shards_are_named_and_counted(faulty_run):
    out, meta = faulty_run
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tfrecord")))
    assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)] + \
                    [f"val-0000{i}-of-00002.tfrecord" for i in range(2)]
    assert meta.to_dict() == json.load(open(os.path.join(out, "metadata.json")))
    assert meta.splits["train"].shards == 3


def test_good_images_all_written_bad_ones_rejected_with_reason(faulty_run, faulty_scene):
    out, meta = faulty_run
    from tests.conftest import N_TRAIN, N_VAL

    written = {r["file_name"] for r in _records(out, "train")}
    bad = faulty_scene["rejected_images"]
    assert len(written) == N_TRAIN - len(bad)
    assert not written & set(bad)
    assert set(faulty_scene["odd_but_good"]) <= written  # greyscale, CMYK, PNG-as-.jpg
    image_rejects = {r["input"]["file_name"]: r for r in _rejects(out) if r["kind"] == "image"}
    assert set(image_rejects) == set(bad)
    for name, words in bad.items():
        assert words in image_rejects[name]["reason"], (name, image_rejects[name]["reason"])
        assert image_rejects[name]["captions"] == 5  # the image's captions go with it, counted
    assert len(_records(out, "val")) == N_VAL


def test_caption_faults_rejected_with_reason(faulty_run, faulty_scene):
    out, _ = faulty_run
    caption_rejects = [r for r in _rejects(out) if r["kind"] == "caption"]
    by_text = {r["input"]["caption"]: r["reason"] for r in caption_rejects}
    assert set(by_text) == set(faulty_scene["rejected_captions"])
    for caption, words in faulty_scene["rejected_captions"].items():
        assert words in by_text[caption]


def test_counts_add_up(faulty_run, faulty_scene):
    out, meta = faulty_run
    from tests.conftest import N_TRAIN, N_VAL

    train, val = meta.splits["train"], meta.splits["val"]
    for info in (train, val):
        for c in (info.images, info.captions):
            assert c.seen == c.written + c.rejected
    assert train.images == metadata.Counts(seen=N_TRAIN, written=N_TRAIN - 4, rejected=4)
    # 5 a scene image, + 2 blank + 1 non-ASCII + 1 orphan + 1 duplicate added
    assert train.captions.seen == 5 * N_TRAIN + 5
    assert train.captions.rejected == 4 * 5 + 4
    assert train.captions.written == sum(len(r["captions"]) for r in _records(out, "train"))
    assert val.captions == metadata.Counts(seen=5 * N_VAL + 1, written=5 * N_VAL + 1, rejected=0)
    rejects = _rejects(out)
    assert sum(r["captions"] for r in rejects) == train.captions.rejected + val.captions.rejected


def test_features_equal_the_saved_encoder_output(faulty_run, faulty_scene):
    out, meta = faulty_run
    inception = backbones.get(meta.encoder.name)
    encoder = inception.load(os.path.join(out, meta.encoder.file))
    recs = {r["file_name"]: r for r in _records(out, "train")}
    names = faulty_scene["odd_but_good"] + sorted(set(recs) - set(faulty_scene["odd_but_good"]))[:2]
    for name in names:
        with open(os.path.join(faulty_scene["dir"], "train2014", name), "rb") as f:
            pixels = images.decode(f.read())
        expected = encoder(inception.prepare(pixels[None]), training=False).numpy()[0]
        got = recs[name]["features"]
        assert got.dtype == np.float16 and got.shape == (64, 2048)
        # float16 keeps ~3 significant digits; batch composition may move the last bits.
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_caption_ids_map_back_to_normalised_text(faulty_run, faulty_scene):
    out, meta = faulty_run
    tokens = vocab.read(os.path.join(out, "vocab.txt"))
    assert len(tokens) == meta.vocab.size
    seen_non_ascii = False
    for rec in _records(out, "train") + _records(out, "val"):
        for ids, raw in zip(rec["captions"], rec["caption_text"]):
            assert ids[0] == vocab.START_ID and ids[-1] == vocab.END_ID
            expected = [w if w in tokens else vocab.UNK for w in text.words([raw])[0]]
            assert [tokens[i] for i in ids[1:-1]] == expected
            if raw == faulty_scene["non_ascii"]:
                seen_non_ascii = True
                assert [tokens[i] for i in ids[1:-1]] == ["un", "carré", "rouge", "à", "gauche"]
    assert seen_non_ascii


def test_vocabulary_from_train_only_sorted_by_count(faulty_run, faulty_scene):
    out, _ = faulty_run
    tokens = vocab.read(os.path.join(out, "vocab.txt"))
    assert tokens[:4] == list(vocab.SPECIALS)
    assert faulty_scene["val_only_word"] not in tokens
    counts = {}
    for rec in _records(out, "train"):
        for raw in rec["caption_text"]:
            for w in text.words([raw])[0]:
                counts[w] = counts.get(w, 0) + 1
    assert tokens[4:] == sorted(counts, key=lambda w: (-counts[w], w))


def _train_word_counts(coco_dir):
    """Each word's count over the training captions of a COCO-layout set, as the captions'
    words (text.words: lower case, no punctuation)."""
    with open(os.path.join(coco_dir, "annotations", "captions_train2014.json")) as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    counts = {}
    for words in text.words(captions):
        for w in words:
            counts[w] = counts.get(w, 0) + 1
    return counts


def _vocab_run(scene_dir, out, *flags):
    _run(["--coco-dir", scene_dir, "--output", out, "--num-shards", "train=1,val=1", *flags])
    with open(os.path.join(out, "vocab.txt")) as f:
        content = f.read()
    with open(os.path.join(out, "metadata.json")) as f:
        info = json.load(f)["vocab"]
    return content, info


def test_min_count_keeps_words_seen_that_often_and_the_rest_become_unk(scene_dir, tmp_path):
    counts = _train_word_counts(scene_dir)
    min_count = 7
    # The scene set has words at exactly 7 (kept: "at least") and words below it (dropped).
    assert any(c == min_count for c in counts.values()) and any(c < min_count for c in counts.values())
    out = str(tmp_path / "data")
    content, info = _vocab_run(scene_dir, out, "--min-count", str(min_count))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    assert content == "\n".join([*vocab.SPECIALS, *kept]) + "\n"      # specials, then by count, ties a-z
    assert info["size"] == 4 + len(kept) and info["min_count"] == min_count
    # Every word seen fewer times is <unk> in the records, and each word kept is its line.
    rare = {w for w, c in counts.items() if c < min_count}
    line = {w: i for i, w in enumerate(content.splitlines())}
    unks = 0
    for rec in _records(out, "train"):
        for ids, raw in zip(rec["captions"], rec["caption_text"]):
            words = text.words([raw])[0]
            assert ids[1:-1] == [vocab.UNK_ID if w in rare else line[w] for w in words], raw
            unks += sum(w in rare for w in words)
    assert unks == sum(counts[w] for w in rare) > 0


def test_vocab_size_keeps_the_most_frequent_words_ties_alphabetically(scene_dir, tmp_path):
    counts = _train_word_counts(scene_dir)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    size = 15
    # Two words with one count either side of the cut: the alphabetically first is kept.
    assert counts[ranked[size - 1]] == counts[ranked[size]] and len(ranked) > size + 5
    out = str(tmp_path / "data")
    content, info = _vocab_run(scene_dir, out, "--vocab-size", str(size))
    assert content == "\n".join([*vocab.SPECIALS, *ranked[:size]]) + "\n"
    tokens = content.splitlines()
    assert ranked[size - 1] in tokens and ranked[size] not in tokens
    assert info["size"] == len(tokens) == 4 + size and info["max_words"] == size


def _raw_features(data_dir, split):
    """[images, 64, 2048] float16: every record's feature bytes as the shards hold them,
    read with TensorFlow's record reader and the Example proto, none of the pipeline's code."""
    import tensorflow as tf

    out = []
    for path in sorted(glob.glob(os.path.join(data_dir, f"{split}-*-of-*.tfrecord"))):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            example = tf.train.Example.FromString(raw)
            [data] = example.features.feature[records.FEATURES].bytes_list.value
            out.append(np.frombuffer(data, np.float16).reshape(64, 2048))
    return np.stack(out)


def test_feature_statistics_over_train(faulty_run):
    out, meta = faulty_run
    from tests.conftest import N_TRAIN

    with np.load(os.path.join(out, "feature_stats.npz")) as z:
        stats = {k: z[k] for k in z.files}
    train = _raw_features(out, "train").astype(np.float64)
    assert train.shape[0] == N_TRAIN - 4                       # the written images (4 rejected)
    rows = train.reshape(-1, 2048)                             # one row per position of each image
    mean, std = rows.mean(0), rows.std(0)                      # per channel; the population std (ddof 0)
    assert stats["mean"].shape == stats["std"].shape == (2048,)
    assert stats["mean"].dtype == stats["std"].dtype == np.float32
    # Both sides add the same float16 values in float64; the file keeps float32.
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-5, atol=1e-10)
    assert int(stats["count"]) == rows.shape[0] == 64 * (N_TRAIN - 4) == meta.features.stats_count
    # Those tolerances tell the training split's statistics from ones over every split, and
    # the population std from the sample one (ddof 1 is 1 + 1/(2n) larger, n = 640 here).
    both = np.concatenate([rows, _raw_features(out, "val").astype(np.float64).reshape(-1, 2048)])
    assert not np.allclose(stats["mean"], both.mean(0), rtol=1e-5, atol=1e-10)
    assert not np.allclose(stats["std"], rows.std(0, ddof=1), rtol=1e-5, atol=1e-10)


def test_channel_stats_combiner_merges_exactly():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3e-4, 8e-4, (64 * k, 8)) for k in (1, 3, 2)]
    from pipelines.transforms import stats

    fn = stats.ChannelStats()
    accs = []
    for part in parts:
        acc = fn.create_accumulator()
        for x in np.split(part, len(part) // 64):
            acc = fn.add_input(acc, x)
        accs.append(acc)
    got = fn.extract_output(fn.merge_accumulators(accs))
    allx = np.concatenate(parts)
    np.testing.assert_allclose(got["mean"], allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["std"], allx.std(0), rtol=1e-5)


def test_multiprocess_runner_gives_the_same_records(faulty_run, faulty_scene, tmp_path):
    out, _ = faulty_run
    out2 = str(tmp_path / "mp")
    _run(["--coco-dir", faulty_scene["dir"], "--output", out2, "--num-shards", "train=3,val=2",
          "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    for split in ("train", "val"):
        a = {r["image_id"]: r for r in _records(out, split)}
        b = {r["image_id"]: r for r in _records(out2, split)}
        assert a.keys() == b.keys()
        for k in a:
            assert a[k]["captions"] == b[k]["captions"] and a[k]["caption_text"] == b[k]["caption_text"]
            np.testing.assert_allclose(a[k]["features"].astype(np.float32), b[k]["features"].astype(np.float32),
                                       rtol=2e-3, atol=1e-6)
    assert open(os.path.join(out, "vocab.txt")).read() == open(os.path.join(out2, "vocab.txt")).read()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipelines.preprocess", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def _one_error_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and "error" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


@pytest.mark.parametrize("args,words", [
    (["--output", "X"], "--coco-dir"),
    (["--coco-dir", "/nonexistent", "--output", "X", "--encoder-weights", "random"], "does not exist"),
    (["--coco-dir", "/tmp", "--output", "X", "--vocab-size", "0"], "--vocab-size"),
    (["--coco-dir", "/tmp", "--output", "X", "--num-shards", "train=0"], "--num-shards"),
    (["--coco-dir", "/tmp", "--output", "X", "--num-shards", "bogus=2"], "unknown split"),
    (["--coco-dir", "/tmp", "--output", "X", "--batch-size", "many"], "--batch-size"),
])
def test_bad_flags_exit_with_one_line(args, words, tmp_path, capsys, clean_logging):
    # In-process: the command's main with an argv (the next test runs the process).
    assert exit_code(preprocess.main, args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and words in lines[-1] and "Traceback" not in err, err


def test_a_bad_flag_exits_the_process_with_one_line():
    proc = _cli("--coco-dir", "/tmp", "--output", "X", "--vocab-size", "0")
    assert proc.returncode == 2
    assert "--vocab-size" in _one_error_line(proc)


def test_unreadable_annotations_exit_nonzero(scene_dir, tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "captions_train2014.json").write_text("{not json")
    proc = _cli("--coco-dir", str(coco), "--output", str(tmp_path / "out"), "--encoder-weights", "random")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "captions_train2014.json" in line and "not valid JSON" in line


def test_imagenet_weights_offline_fail_at_once_naming_the_choices(scene_dir, tmp_path):
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras"))
    if backbones.get("inception_v3")._imagenet_reachable():
        pytest.skip("this machine can download the ImageNet weights")
    proc = _cli("--coco-dir", scene_dir, "--output", str(tmp_path / "out"), "--encoder-weights", "imagenet", env=env)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "random" in line and "PATH" in line
    assert not glob.glob(str(tmp_path / "out" / "*.tfrecord"))


def test_existing_output_needs_overwrite(faulty_run, faulty_scene):
    out, _ = faulty_run
    with pytest.raises(preprocess.UsageError, match="--overwrite"):
        _run(["--coco-dir", faulty_scene["dir"], "--output", out])


def test_a_killed_run_is_refused_by_the_trainer_and_finished_by_the_same_command(scene_dir, tmp_path):
    """kill -9 while a shard is being written; the same command again keeps the
    shards finished before the kill, removes what was half-done and ends with the
    data set an uninterrupted run writes."""
    import signal
    import time

    from pipelines import shards

    out = str(tmp_path / "killed")
    args = ["--coco-dir", scene_dir, "--output", out, "--encoder-weights", "random", "--seed", "5",
            "--num-shards", "train=7,val=2"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # A shard finished and another one under way: the moment to pull the plug.
        if (glob.glob(os.path.join(out, shards.DONE_DIR, "*.json"))
                and glob.glob(os.path.join(out, "*" + shards.PARTIAL + "*"))):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {os.path.basename(p) for p in glob.glob(os.path.join(out, shards.DONE_DIR, "*.json"))}
    assert finished_before and shards.leftovers(out)
    with pytest.raises(metadata.MetadataError, match="no metadata.json"):
        metadata.read(out)

    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming the unfinished run" in again.stderr
    assert again.stderr.count("kept, finished by an earlier run") == len(finished_before), again.stderr
    assert not shards.leftovers(out)
    assert not [d for d in os.listdir(out) + os.listdir(os.path.join(out, "rejected")) if d.startswith("beam-temp")]

    clean = str(tmp_path / "clean")   # an uninterrupted run of the same flags (in this process: no start-up)
    _run(["--coco-dir", scene_dir, "--output", clean, "--num-shards", "train=7,val=2"])
    a_meta, b_meta = (metadata.read(d) for d in (out, clean))
    for split in ("train", "val"):
        assert a_meta.splits[split].images == b_meta.splits[split].images
        assert [f.records for f in a_meta.splits[split].files] == [f.records for f in b_meta.splits[split].files]
        a, b = ({r["image_id"]: r for r in _records(d, split)} for d in (out, clean))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k]["captions"] == b[k]["captions"]
            np.testing.assert_allclose(a[k]["features"].astype(np.float32), b[k]["features"].astype(np.float32),
                                       rtol=2e-3, atol=1e-6)
    assert open(os.path.join(out, "vocab.txt")).read() == open(os.path.join(clean, "vocab.txt")).read()
    metadata.read(out)  # the trainer takes it now
