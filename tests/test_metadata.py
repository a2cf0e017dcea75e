"""metadata.json through its contract (caption_io.metadata): a real file reads and writes
back unchanged, and a file this code cannot read is refused in one line saying why."""
from __future__ import annotations

import json
import os

import pytest

from caption_io import geometry, metadata
from pipelines import validate


def _raw(data_dir):
    with open(os.path.join(data_dir, "metadata.json")) as f:
        return json.load(f)


def _dir_with(tmp_path, content, name="data"):
    d = tmp_path / name
    d.mkdir()
    (d / "metadata.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return str(d)


def test_a_real_file_round_trips(small_data, tmp_path):
    meta = metadata.read(small_data)
    assert meta.to_dict() == _raw(small_data)
    assert metadata.Metadata.from_dict(meta.to_dict()) == meta
    # Written again, the same bytes as the pipeline wrote.
    out = tmp_path / "again"
    out.mkdir()
    metadata.write(str(out), meta)
    assert (out / "metadata.json").read_bytes() == open(os.path.join(small_data, "metadata.json"), "rb").read()
    assert meta.features.shape == (64, 2048) and meta.splits["train"].files[0].name.startswith("train-")
    assert meta.max_tokens == max(s.max_tokens for s in meta.splits.values())


def test_a_file_from_before_shard_lists_round_trips(small_data):
    old = _raw(small_data)
    for info in old["splits"].values():
        del info["files"]
    meta = metadata.Metadata.from_dict(old)
    assert meta.splits["train"].files is None and meta.to_dict() == old


def test_another_format_version_is_refused_saying_which(small_data, tmp_path, capsys):
    d = _dir_with(tmp_path, dict(_raw(small_data), format_version=metadata.FORMAT_VERSION + 1))
    want = f"format_version {metadata.FORMAT_VERSION + 1}, and this code reads format_version 1, 2 or 3"
    with pytest.raises(metadata.MetadataError, match=want) as e:
        metadata.read(d)
    assert str(e.value).startswith(os.path.join(d, "metadata.json") + ": ")
    # A command: one error line, exit 2.
    assert validate.main([d]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and want in err[-1]


def test_a_version_1_file_reads_as_the_inception_v3_data_it_is(small_data, tmp_path):
    """Version 1 (before the choice of backbone) has no encoder name, grid or channels; a
    version-1 data directory still trains and exports, as InceptionV3's 8x8x2048."""
    old = _raw(small_data)
    for key in ("name", "grid", "channels"):
        del old["encoder"][key]
    del old["vocab"]["tokenizer"]
    old["format_version"] = 1
    meta = metadata.read(_dir_with(tmp_path, old))
    assert (meta.encoder.name, meta.geometry) == ("inception_v3", geometry.INCEPTION_V3)
    assert meta.to_dict() == _raw(small_data)  # read as the version-3 file it means


def test_a_version_2_file_reads_as_the_word_vocabulary_it_has(small_data, tmp_path):
    """Version 2 (before the tokenizer modes) has no vocab.tokenizer: its tokens were words."""
    old = _raw(small_data)
    del old["vocab"]["tokenizer"]
    old["format_version"] = 2
    meta = metadata.read(_dir_with(tmp_path, old))
    assert meta.vocab.tokenizer == "words" and meta.to_dict() == _raw(small_data)


def _set_tokenizer(raw):
    raw["vocab"]["tokenizer"] = "bpe"


def test_features_of_another_shape_than_the_encoder_makes_are_refused(small_data, tmp_path):
    raw = _raw(small_data)
    raw["features"]["shape"] = [49, 960]
    with pytest.raises(metadata.MetadataError, match=r"features.shape \[49, 960\] is not the encoder's "
                                                     r"8x8x2048 features of 299x299 images"):
        metadata.read(_dir_with(tmp_path, raw))


def _drop(*keys):
    def change(raw):
        *path, last = keys
        for k in path:
            raw = raw[k]
        del raw[last]
    return change


def _set_val_written(raw):
    raw["splits"]["val"]["images"]["written"] = "five"


@pytest.mark.parametrize("change, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "the file is not a JSON object"),
    (_drop("vocab"), "incomplete (no vocab)"),
    (_drop("format_version"), "incomplete (no format_version)"),
    (_drop("splits", "train"), "incomplete (no splits.train)"),
    (_drop("encoder", "sha256"), "incomplete (no encoder.sha256)"),
    (_drop("encoder", "grid"), "incomplete (no encoder.grid)"),
    (_drop("vocab", "tokenizer"), "incomplete (no vocab.tokenizer)"),
    (_set_tokenizer, "vocab.tokenizer 'bpe' is not one of words, chars, wordpiece"),
    (_set_val_written, "splits.val.images.written is 'five', not an integer"),
])
def test_a_broken_file_is_one_clear_error(small_data, tmp_path, change, words):
    if isinstance(change, str):
        content = change
    else:
        content = _raw(small_data)
        change(content)
    d = _dir_with(tmp_path, content)
    with pytest.raises(metadata.MetadataError) as e:
        metadata.read(d)
    assert str(e.value).startswith(os.path.join(d, "metadata.json") + ": ") and words in str(e.value)


def test_no_metadata_json_is_not_a_data_directory(tmp_path):
    with pytest.raises(metadata.MetadataError, match="no metadata.json"):
        metadata.read(str(tmp_path))
