"""gs:// paths through a Cloud Storage emulator on loopback (gcp-storage-emulator).

The google-cloud-storage client honours STORAGE_EMULATOR_HOST, and so does Beam's
GCS IO (it builds its client with that library): the project's small-file reading
and writing (caption_io.fileio), caption's inputs and plots, and a whole pipeline
run with --output gs://... go to the emulator here exactly as they would go to
Cloud Storage.

TensorFlow's own gs:// file system (tf.data reading shards, checkpoints, summaries,
SavedModels) has its endpoint compiled in (www.googleapis.com/storage/v1) and no
emulator setting, so it cannot be pointed at one: those paths go through
tf.io.gfile, the same interface for local paths and gs://, and the trainer's
tests exercise that interface with local paths.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from caption_io import fileio, geometry, metadata, records


def test_small_files_round_trip(gcs):
    base = fileio.join(gcs, "run1")
    assert fileio.join(gcs + "/", "/a/", "b.json") == f"{gcs}/a/b.json"
    assert not fileio.exists(base)

    fileio.write_json(fileio.join(base, "metadata.json"), {"vocab": {"size": 7}, "word": "carré"})
    fileio.write_text(fileio.join(base, "vocab.txt"), "<pad>\n<unk>\nrouge\n")
    fileio.write_bytes(fileio.join(base, "rejected", "rejected-00000-of-00001.jsonl"), b'{"kind": "image"}\n')

    assert fileio.read_json(fileio.join(base, "metadata.json")) == {"vocab": {"size": 7}, "word": "carré"}
    assert fileio.read_text(fileio.join(base, "vocab.txt")).splitlines() == ["<pad>", "<unk>", "rouge"]
    # Objects and "directories" (a prefix some object lives under) both exist.
    assert fileio.exists(fileio.join(base, "vocab.txt"))
    assert fileio.exists(base) and fileio.exists(fileio.join(base, "rejected"))
    assert not fileio.exists(fileio.join(base, "rej"))  # a name prefix is not a directory
    assert fileio.list_files(base) == [f"{base}/metadata.json", f"{base}/rejected/rejected-00000-of-00001.jsonl",
                                       f"{base}/vocab.txt"]
    assert fileio.list_files(base, ".jsonl") == [f"{base}/rejected/rejected-00000-of-00001.jsonl"]

    fileio.remove(fileio.join(base, "vocab.txt"))
    assert not fileio.exists(fileio.join(base, "vocab.txt"))
    assert fileio.list_files(base, ".txt") == []


def test_upload_and_local_copy_keep_bytes(gcs, tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    src = tmp_path / "weights.h5"
    src.write_bytes(data)
    dest = fileio.join(gcs, "job", "encoder.weights.h5")
    fileio.upload(str(src), dest)
    local = fileio.local_copy(dest)
    try:
        assert local != dest and os.path.isfile(local)
        with open(local, "rb") as f:
            assert f.read() == data
    finally:
        os.remove(local)
    with fileio.open_read(dest) as f:  # streamed, in pieces
        assert f.read(1000) == data[:1000]
        assert f.read() == data[1000:]
    assert fileio.size(dest) == len(data) and fileio.size(fileio.join(gcs, "job", "nothing")) is None


def test_missing_objects_fail_like_missing_files(gcs, tmp_path):
    missing = fileio.join(gcs, "nothing", "here.json")
    for call in (lambda: fileio.read_json(missing), lambda: fileio.local_copy(missing), lambda: fileio.remove(missing)):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert e.value.filename == missing
    with pytest.raises(FileNotFoundError):
        with fileio.open_read(missing) as f:
            f.read()
    # A bucket that does not exist: one error naming the path, not a client traceback.
    with pytest.raises(FileNotFoundError):
        fileio.read_bytes("gs://no-such-bucket-here/x")
    with pytest.raises(ValueError, match="bucket"):
        fileio.read_bytes("gs:///x")


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_caption_reads_gs_inputs_with_the_byte_cap(gcs):
    from caption_serving import caption

    path = fileio.join(gcs, "images", "red.jpg")
    fileio.write_bytes(path, _jpeg((200, 10, 10)))
    data, pixels = caption.load_input(path, timeout=5, max_bytes=1 << 20)
    assert pixels.shape == (30, 40, 3) and pixels[..., 0].mean() > 150
    assert data == fileio.read_bytes(path)
    with pytest.raises(caption.InputError, match="no such file"):
        caption.load_input(fileio.join(gcs, "images", "absent.jpg"), timeout=5, max_bytes=1 << 20)
    with pytest.raises(caption.InputError, match="cap"):
        caption.load_input(path, timeout=5, max_bytes=100)


@pytest.mark.slow
def test_pipeline_writes_its_data_set_to_gcs(gcs, scene_dir):
    """preprocess --output gs://...: Beam writes the shards and rejects through its GCS IO,
    the launcher and the metadata step through fileio; all of it lands in the bucket."""
    from pipelines import preprocess
    from tests.conftest import N_TRAIN, N_VAL

    out = fileio.join(gcs, "data")
    meta = preprocess.run(["--coco-dir", scene_dir, "--output", out, "--num-shards", "train=2,val=1",
                           "--encoder-weights", "random", "--seed", "5"])
    assert meta == fileio.read_json(fileio.join(out, records.METADATA_FILE))
    shards = fileio.list_files(out, records.SHARD_SUFFIX)
    assert [s.rsplit("/", 1)[1] for s in shards] == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord", "val-00000-of-00001.tfrecord"]
    meta = metadata.Metadata.from_dict(meta)
    for f in ("vocab.txt", meta.features.stats_file, meta.encoder.file):
        assert fileio.exists(fileio.join(out, f)), f
    locals_ = [fileio.local_copy(s) for s in shards]
    try:
        train = records.read_records(locals_[:2], meta.features.shape)
        val = records.read_records(locals_[2:], meta.features.shape)
    finally:
        for p in locals_:
            os.remove(p)
    assert len(train) == N_TRAIN == meta.splits["train"].images.written
    assert len(val) == N_VAL == meta.splits["val"].images.written
    assert train[0]["features"].shape == geometry.DEFAULT.feature_shape
    # The shards were renamed into place whole, and they are what metadata.json says they are.
    from pipelines import shards as shards_lib
    from pipelines import validate

    assert not shards_lib.leftovers(out)
    assert validate.validate(out, full=False)[1] == []
