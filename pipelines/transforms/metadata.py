"""The last step: what the data directory holds, written once everything else is.

metadata.json is written last, so a data directory without it is an unfinished
run: the trainer refuses it, and the same preprocess command resumes it.
"""
from __future__ import annotations

import io

import apache_beam as beam
import numpy as np

from caption_io import fileio, records
from pipelines import shards
from caption_io import vocab as vocab_lib

STATS_FILE = "feature_stats.npz"


def seen_events(entry):
    """(split, what, "seen") counts of a manifest entry, before any check."""
    yield (entry["split"], "images", "seen"), 1
    yield (entry["split"], "captions", "seen"), len(entry["captions"])


def annotation_seen_events(rej):
    """What an annotation-level reject (made before the pipeline) had been."""
    for what in ("images", "captions"):
        if rej[what]:
            yield (rej["split"], what, "seen"), rej[what]


def rejected_events(rej):
    for what in ("images", "captions"):
        if rej[what]:
            yield (rej["split"], what, "rejected"), rej[what]


def written_events(summary):
    yield (summary["split"], "images", "written"), summary["images"]
    yield (summary["split"], "captions", "written"), summary["captions"]


class WriteMetadata(beam.DoFn):
    """Once every side input is ready: vocab.txt, feature_stats.npz, metadata.json
    (after checking that every input was either written or rejected)."""

    def __init__(self, output: str, static: dict):
        self._output = output
        self._static = static

    def process(self, _, tokens, channel_stats, counts, summaries, rejects_written=()):
        # rejects_written: the rejects sink's files, a side input only so that this runs after it.
        if channel_stats is None:
            raise RuntimeError("no training image was written, so there are no feature statistics "
                               "(see the rejected/ records)")
        vocab_lib.write(fileio.join(self._output, vocab_lib.FILE_NAME), tokens)
        buf = io.BytesIO()
        np.savez(buf, mean=channel_stats["mean"], std=channel_stats["std"], count=np.int64(channel_stats["count"]))
        fileio.write_bytes(fileio.join(self._output, STATS_FILE), buf.getvalue())
        meta = dict(self._static)
        meta["vocab"] = dict(meta["vocab"], size=len(tokens))
        meta["features"] = dict(meta["features"], stats_count=int(channel_stats["count"]))
        splits = {}
        for split, info in meta["splits"].items():
            info = dict(info)
            for what in ("images", "captions"):
                got = {k: int(counts.get((split, what, k), 0)) for k in ("seen", "written", "rejected")}
                if got["seen"] != got["written"] + got["rejected"]:
                    raise RuntimeError(f"{split} {what}: seen {got['seen']} != written {got['written']} "
                                       f"+ rejected {got['rejected']}: an input was lost")
                info[what] = got
            mine = sorted((s for s in summaries if s["split"] == split), key=lambda s: s["name"])
            if len(mine) != info["shards"]:
                raise RuntimeError(f"{split}: {len(mine)} shards written, {info['shards']} planned")
            info["max_tokens"] = max((s["max_tokens"] for s in mine), default=0)
            # What each shard must hold: a later reader can check a copy against it.
            info["files"] = [{k: s[k] for k in ("name", "records", "bytes", "sha256")} for s in mine]
            splits[split] = info
        meta["splits"] = splits
        # Whatever a failed attempt (a retried bundle) left behind goes before the run is declared done.
        shards.remove_leftovers(self._output)
        fileio.write_json(fileio.join(self._output, records.METADATA_FILE), meta)
        yield meta
