"""Shards as units of work: which image goes to which shard, a writer that puts
a shard under its final name only when it is whole, and the record of a
finished shard that lets a rerun keep it.

Why shards are units of work (README, "Memory"): a writer that groups
finished records by shard holds every record in memory on Beam's DirectRunner,
so instead the small manifest entries are grouped by shard and each shard is
encoded and written by one DoFn call, streaming. The assignment is fixed before
the pipeline runs (deterministic from the manifest), so a shard's inputs are
known up front and a rerun can tell a finished shard from one to redo.

Layout in a data directory:
    train-00003-of-00016.tfrecord                the shard (appears only when complete)
    train-00003-of-00016.tfrecord.partial-<hex>  while it is written (removed by the next run)
    shards/train-00003-of-00016.json             what the finished shard holds, written after it
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

from caption_io import datadir, fileio, records
from caption_io.datadir import DONE_DIR, PARTIAL  # noqa: F401  (DONE_DIR: read through this module too)

BEAM_TEMP = "beam-temp-"  # Beam's own file sinks (the rejects) stage their output here


def assign(entries: list[dict], count: int) -> None:
    """Set entry["shard"] for one split's entries: ranked by image id and dealt
    round-robin, so shards differ by at most one image and every shard gets
    images from the whole id range. The same entries always get the same shards."""
    if count < 1:
        raise ValueError(f"a split needs at least 1 shard, got {count}")
    for rank, entry in enumerate(sorted(entries, key=lambda e: (e["image_id"], e["file_name"]))):
        entry["shard"] = rank % count


def fingerprint(entries: list[dict], tokens: list[str], tokenizer: str, encoder_sha256: str,
                precision: str = "float32") -> str:
    """Everything a shard's bytes depend on: its images and captions (as
    tokenised), the vocabulary and its mode, and the encoder with the precision
    it computes in (a resumed run never mixes float32 and bfloat16 features)."""
    h = hashlib.sha256()
    h.update(encoder_sha256.encode())
    # float32 adds nothing: a float32 shard's digest is that of its other inputs, as unfinished runs recorded it.
    if precision != "float32":
        h.update(f"precision {precision}".encode())
    h.update(tokenizer.encode())
    h.update("\n".join(tokens).encode("utf-8"))
    for e in entries:
        h.update(json.dumps([e["image_id"], e["file_name"], e["path"],
                             [[c["text"], c["words"]] for c in e["captions"]]],
                            ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def done_path(data_dir: str, name: str) -> str:
    return fileio.join(data_dir, datadir.done_name(name))


def read_done(data_dir: str, name: str, expected_fingerprint: str) -> dict | None:
    """The record of shard `name` if it finished with these inputs and its file
    is still the size it was written at; None means: write it (again)."""
    path = done_path(data_dir, name)
    if not fileio.exists(path):
        return None
    try:
        done = fileio.read_json(path)
    except ValueError:  # cut short: redo the shard
        return None
    if done.get("fingerprint") != expected_fingerprint:
        return None
    if fileio.size(fileio.join(data_dir, name)) != done.get("bytes"):
        return None
    return done


def write_done(data_dir: str, name: str, done: dict) -> None:
    fileio.write_json(done_path(data_dir, name), done)


class ShardWriter:
    """Streams framed records to `path` + PARTIAL + a random suffix and renames
    the file to `path` on commit, so no reader (and no rerun) ever sees half a
    shard under its final name. Writes through Beam's FileSystems: local or gs://."""

    def __init__(self, path: str):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        self.path = path
        self._tmp = f"{path}{PARTIAL}{uuid.uuid4().hex[:12]}"
        with fileio.writing(path):  # a refused write names the shard, not its partial file
            self._file = FileSystems.create(self._tmp, compression_type=CompressionTypes.UNCOMPRESSED)
        self._sha = hashlib.sha256()
        self.records = 0
        self.bytes = 0

    def write(self, record: bytes) -> None:
        framed = records.frame(record)
        with fileio.writing(self.path):
            self._file.write(framed)
        self._sha.update(framed)
        self.records += 1
        self.bytes += len(framed)

    def commit(self) -> dict:
        """Close, move into place; returns what the shard holds."""
        from apache_beam.io.filesystems import FileSystems

        with fileio.writing(self.path):
            self._file.close()
            FileSystems.rename([self._tmp], [self.path])
        return {"name": os.path.basename(self.path), "records": self.records, "bytes": self.bytes,
                "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        from apache_beam.io.filesystems import FileSystems

        try:
            self._file.close()
        except OSError:
            pass  # a full disk fails the close too; the error being handled says so
        finally:
            if FileSystems.exists(self._tmp):
                FileSystems.delete([self._tmp])


def leftovers(data_dir: str) -> list[str]:
    """Files an interrupted run left behind: partial shards, small files caught
    before their rename, Beam's staging files."""
    if not fileio.exists(data_dir):
        return []
    return [f for f in fileio.list_files(data_dir)
            if PARTIAL in os.path.basename(f) or fileio.TMP_MARK in os.path.basename(f) or f"/{BEAM_TEMP}" in f]


def remove_leftovers(data_dir: str) -> int:
    """Remove what `leftovers` finds, and Beam's emptied staging folders; returns how many files."""
    found = leftovers(data_dir)
    for f in found:
        fileio.remove(f)
    if not fileio.is_gcs(data_dir):  # local folders outlive their files
        for root, dirs, _ in os.walk(data_dir):
            for d in [d for d in dirs if d.startswith(BEAM_TEMP)]:
                shutil.rmtree(os.path.join(root, d))
                dirs.remove(d)
    return len(found)
