"""metadata.json, what a data directory holds: the one place that names its keys.

The pipeline writes it last (pipelines.transforms.metadata), so a data directory
without one is an unfinished run; the trainer, the export, the evaluator, the
validator and the benchmarks read it. Each reads it through `read`, which refuses
a missing file, bad JSON, a missing or mistyped key and a format_version other
than FORMAT_VERSION in one line, before anything else is done with the
directory, rather than as a KeyError somewhere later.

The dataclasses are the schema: a field's name is its key in the file, so
`Metadata.to_dict` writes and `Metadata.from_dict` reads the same keys, with
no second spelling of them anywhere. A field that defaults to None is one that
older data directories lack (Split.files) or that only some sources have
(Source); it is left out of the file when None, so reading a file and writing
it again gives the same JSON.

Beside the schema, the checks that need only metadata.json and file sizes
(`check_sizes`: cheap, local or gs://) and what the trainer, export and
evaluator take from a data directory through it (`shard_files`, `load_vocab`,
`load_feature_stats`).
"""
from __future__ import annotations

import dataclasses
import io
import types
import typing

import numpy as np
import tensorflow as tf

from caption_io import cli, datadir, fileio, tokenizer
from caption_io import geometry as geometry_lib
from caption_io import vocab as vocab_lib

FILE_NAME = datadir.METADATA_FILE
# The layout this code writes and reads. A change that an older reader would misread
# (a key renamed, removed or given another meaning) comes with a new version.
# 2: the encoder is one of several backbones, and its record says which and its geometry
#    (name, grid, channels). Version 1 (InceptionV3 only) is still read, as that.
# 3: the vocabulary's tokens are words, characters or word pieces (vocab.tokenizer, a
#    caption_io.tokenizer mode). Versions 1 and 2 (words only) are still read, as that.
FORMAT_VERSION = 3
READS = (1, 2, 3)

RERUN = "re-run `python -m pipelines.preprocess` for it (or copy the data directory again)"


class MetadataError(ValueError, cli.UserError):
    """A data directory that cannot be used as it is: no metadata.json, one that is not
    this code's format, or files that disagree with it (one readable line, exit 2)."""


class _Part:
    """Each part of metadata.json writes itself as it is in the file."""

    def to_dict(self) -> dict:
        """This part's JSON: JSON types only (lists, not tuples), optional fields left out when None."""
        return _to_json(self)


def _optional():
    """A field older files or some sources lack: None, and then not written."""
    return dataclasses.field(default=None, metadata={"optional": True})


@dataclasses.dataclass(frozen=True)
class Counts(_Part):
    """What happened to a split's images or captions: every input seen was either written or rejected."""
    seen: int
    written: int
    rejected: int


@dataclasses.dataclass(frozen=True)
class ShardFile(_Part):
    """One shard as it was written, so a copy can be checked against it."""
    name: str  # relative to the data directory
    records: int
    bytes: int
    sha256: str

    def path(self, data_dir: str) -> str:
        return fileio.join(data_dir, self.name)


@dataclasses.dataclass(frozen=True)
class Split(_Part):
    shards: int
    pattern: str  # the shards' names, as Beam's template: train-SSSSS-of-NNNNN.tfrecord
    images: Counts
    captions: Counts
    max_tokens: int  # the longest caption, <start> and <end> included
    # Every shard, in order; None in data directories written before shards were listed.
    files: tuple[ShardFile, ...] | None = _optional()


@dataclasses.dataclass(frozen=True)
class Features(_Part):
    shape: tuple[int, ...]
    dtype: str
    standardise: str
    stats_file: str  # the per-channel mean and std, beside metadata.json
    stats_count: int  # feature vectors the statistics were taken over


@dataclasses.dataclass(frozen=True)
class Encoder(_Part):
    """The weights that made the features; serving must encode images with exactly these."""
    name: str  # the backbone (model/backbones.py): inception_v3, mobilenet_v3_large, ...
    architecture: str
    weights: str
    seed: int | None  # random weights' seed; None (written as null) for pretrained ones
    file: str
    sha256: str
    input_size: int
    input_scaling: str
    grid: tuple[int, ...]  # the feature map's [rows, columns]
    channels: int
    # What it computed the features in (model/precision.py): float32 or bfloat16; None where a
    # file does not say, and then the features are float32's.
    precision: str | None = _optional()

    @property
    def computed_in(self) -> str:
        """The precision the features were computed in: float32 or bfloat16."""
        return self.precision or "float32"

    @property
    def geometry(self) -> geometry_lib.Geometry:
        rows, columns = self.grid
        return geometry_lib.Geometry(self.input_size, rows, columns, self.channels)

    def makes_same_features(self, record: dict | None) -> bool:
        """Whether the encoder a record describes (job.json's copy of this part, as to_dict wrote
        it) makes the same features: the same backbone with the same weights (the same seed for
        random ones, the same file for a PATH)."""
        if not record:
            return True  # a job from before jobs kept their encoder: nothing to compare
        if (record["name"], record["weights"], record["seed"]) != (self.name, self.weights, self.seed):
            return False
        return self.weights in ("imagenet", "random") or record["sha256"] == self.sha256

    @staticmethod
    def describe(record: dict) -> str:
        """A record's encoder in one phrase: "inception_v3 (random weights, seed 0)"."""
        weights = record["weights"]
        what = f"random weights, seed {record['seed']}" if weights == "random" else f"{weights} weights"
        return f"{record['name']} ({what})"

    def identity(self) -> str:
        """"inception_v3 (random weights, seed 0)": for error lines."""
        return self.describe(self.to_dict())


# What version 1 (InceptionV3 only) left unsaid about its encoder.
_V1_ENCODER = {"name": "inception_v3", "grid": [geometry_lib.INCEPTION_V3.rows, geometry_lib.INCEPTION_V3.columns],
               "channels": geometry_lib.INCEPTION_V3.channels}


@dataclasses.dataclass(frozen=True)
class Vocab(_Part):
    file: str
    size: int
    max_words: int  # --vocab-size: tokens beyond the specials, at most
    min_count: int
    specials: tuple[str, ...]
    built_from: str
    tokenizer: str  # what a token is: caption_io.tokenizer's words, chars or wordpiece


@dataclasses.dataclass(frozen=True)
class MaxCaptions(_Part):
    """--max-captions: the seeded subset of training captions kept."""
    kept: int
    available: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Source(_Part):
    """Where the images and captions came from; which optional fields a source has depends on its kind."""
    kind: str  # coco, karpathy or jsonl
    path: str  # COCO's folder, Karpathy's split file, or the JSON-lines file
    year: str | None = _optional()  # coco
    images_dir: str | None = _optional()  # karpathy: COCO's folder
    val_fraction: float | None = _optional()  # jsonl
    max_captions: MaxCaptions | None = _optional()


@dataclasses.dataclass(frozen=True)
class Metadata(_Part):
    format_version: int
    created: str
    command: str
    source: Source
    encoder: Encoder
    features: Features
    vocab: Vocab
    splits: dict[str, Split]
    rejected: str  # the rejects' folder
    inputs: str  # the manifests' folder

    @property
    def max_tokens(self) -> int:
        """The longest caption of any split: what generation and XLA buckets are sized by."""
        return max(info.max_tokens for info in self.splits.values())

    @classmethod
    def from_dict(cls, d, where: str = FILE_NAME) -> Metadata:
        """The inverse of to_dict. Raises MetadataError, naming `where` and the key, for a
        missing or mistyped key or a format_version this code does not read; keys it does
        not know are left out."""
        version = d.get("format_version") if isinstance(d, dict) else None
        if isinstance(d, dict) and "format_version" in d and version not in READS:
            readable = f"{', '.join(map(str, READS[:-1]))} or {READS[-1]}"
            raise MetadataError(f"{where}: format_version {version!r}, and this code reads format_version "
                                f"{readable}: re-run `python -m pipelines.preprocess` with this code, or use "
                                "the code that wrote it")
        if version == 1 and isinstance(d.get("encoder"), dict):  # read as the version-2 record it means
            d = dict(d, encoder={**_V1_ENCODER, **d["encoder"]})
        if version in (1, 2) and isinstance(d.get("vocab"), dict):  # their tokens were words
            d = dict(d, format_version=FORMAT_VERSION, vocab={"tokenizer": tokenizer.WORDS, **d["vocab"]})
        meta = _from_json(cls, d, where, "")
        if meta.vocab.tokenizer not in tokenizer.MODES:
            raise MetadataError(f"{where}: vocab.tokenizer {meta.vocab.tokenizer!r} is not one of "
                                f"{', '.join(tokenizer.MODES)}")
        if "train" not in meta.splits:
            raise MetadataError(f"{where}: incomplete (no splits.train)")
        if tuple(meta.features.shape) != meta.encoder.geometry.feature_shape:
            raise MetadataError(f"{where}: features.shape {list(meta.features.shape)} is not the encoder's "
                                f"{meta.encoder.geometry.describe()}")
        return meta

    @property
    def geometry(self) -> geometry_lib.Geometry:
        """The features' geometry: the encoder's input size, grid and channels."""
        return self.encoder.geometry


def _to_json(value):
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if not (v is None and f.metadata.get("optional")):
                out[f.name] = _to_json(v)
        return out
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


_SCALARS = {int: "an integer", float: "a number", str: "a string"}


def _from_json(tp, value, where: str, key: str):
    """`value` (parsed JSON) as type `tp`, checked all the way down; `key` is its path in the
    file (`splits.train.files[0]`), which an error names."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _from_json(tp, value, where, key)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_json(tp, value, where, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise MetadataError(f"{where}: {key} is not a JSON object")
        return {k: _from_json(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise MetadataError(f"{where}: {key} is not a list")
        return tuple(_from_json(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
    kinds = (int, float) if tp is float else tp  # JSON has one kind of number
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise MetadataError(f"{where}: {key} is {value!r}, not {_SCALARS[tp]}")
    return value


def _dataclass_from_json(tp, value, where: str, key: str):
    """A JSON object as dataclass `tp`: every field it has, checked; a missing field is an error
    unless the field is optional; keys that are not fields are left out."""
    if not isinstance(value, dict):
        raise MetadataError(f"{where}: {key or 'the file'} is not a JSON object")
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for f in dataclasses.fields(tp):
        sub = f"{key}.{f.name}" if key else f.name
        if f.name in value:
            kwargs[f.name] = _from_json(hints[f.name], value[f.name], where, sub)
        elif not f.metadata.get("optional"):
            raise MetadataError(f"{where}: incomplete (no {sub})")
    return tp(**kwargs)


def read(data_dir: str) -> Metadata:
    """A data directory's metadata.json (local or gs://), or one MetadataError line
    saying what is wrong with it."""
    path = fileio.join(data_dir, FILE_NAME)
    if not fileio.exists(path):
        raise MetadataError(f"{data_dir}: no {FILE_NAME} (not a data directory, or its preprocess run did not "
                            "finish; make one with `python -m pipelines.preprocess`)")
    try:
        d = fileio.read_json(path)
    except ValueError as e:
        raise MetadataError(f"{path}: not valid JSON ({e})") from None
    return Metadata.from_dict(d, path)


def check_encoder(recorded: dict | None, meta: Metadata, user: str, data: str) -> None:
    """Refuse, in one line, data whose features another encoder made than the one `user` (a job,
    an export) was trained on; `recorded`: its copy of that data's encoder record."""
    if not meta.encoder.makes_same_features(recorded):
        raise MetadataError(f"{user}: trained on features of {Encoder.describe(recorded)}, and {data} holds "
                            f"features of {meta.encoder.identity()}: use the data it trained on")


def write(data_dir: str, meta: Metadata) -> None:
    fileio.write_json(fileio.join(data_dir, FILE_NAME), meta.to_dict())


# ---------------------------------------------------------------- the directory, checked against it
def check_sizes(data_dir: str, meta: Metadata, split: str) -> list[str]:
    """One line per listed shard that is missing or not the size it was written at
    (none for a split whose shards are not listed)."""
    problems = []
    for f in meta.splits[split].files or ():
        path = f.path(data_dir)
        got = fileio.size(path)
        if got is None:
            problems.append(f"{path}: missing (metadata.json lists it with {f.records} records); {RERUN}")
        elif got != f.bytes:
            why = "cut short (an interrupted copy or a full disk?)" if got < f.bytes else "larger than written"
            problems.append(f"{path}: {got:,} bytes where metadata.json says {f.bytes:,}: {why}; {RERUN}")
    return problems


def shard_files(data_dir: str, split: str, meta: Metadata | None = None) -> list[str]:
    """A split's shard files. Given the metadata, exactly the shards it lists, each
    checked to be there at the size it was written at (a truncated copy or a cut-short
    write fails here, naming the file, rather than mid-epoch); else those the glob finds."""
    if meta is not None and split not in meta.splits:
        raise MetadataError(f"--data {data_dir}: no {split} split (metadata.json has {', '.join(meta.splits)})")
    listed = meta.splits[split].files if meta is not None else None
    if listed is not None:
        problems = check_sizes(data_dir, meta, split)
        if problems:
            more = (f" (and {len(problems) - 1} more: `python -m pipelines.validate {data_dir}`)"
                    if len(problems) > 1 else "")
            raise MetadataError(problems[0] + more)
        return [f.path(data_dir) for f in listed]
    files = sorted(tf.io.gfile.glob(datadir.shard_glob(data_dir, split)))
    if not files:
        raise MetadataError(f"--data {data_dir}: no {split} shards ({datadir.shard_glob(data_dir, split)})")
    return files


def load_vocab(data_dir: str, meta: Metadata) -> list[str]:
    """The vocabulary, checked to be the size metadata.json says."""
    tokens = vocab_lib.read(fileio.join(data_dir, meta.vocab.file))
    if len(tokens) != meta.vocab.size:
        raise MetadataError(f"--data {data_dir}: vocab.txt has {len(tokens)} tokens, "
                            f"metadata.json says {meta.vocab.size}")
    return tokens


def load_feature_stats(data_dir: str, meta: Metadata) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and std the features are standardised with (float32)."""
    with np.load(io.BytesIO(fileio.read_bytes(fileio.join(data_dir, meta.features.stats_file)))) as z:
        return z["mean"].astype(np.float32), z["std"].astype(np.float32)
