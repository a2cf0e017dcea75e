"""The last step: what the data directory holds, written once everything else is.

metadata.json is written last, so a data directory without it is an unfinished
run: the trainer refuses it, and the same preprocess command resumes it. Its
schema is caption_io.metadata's: the launcher plans a Metadata (`planned_split`
for each split), and WriteMetadata fills in what only the pipeline can count.
"""
from __future__ import annotations

import dataclasses
import io

import apache_beam as beam
import numpy as np

from caption_io import datadir, fileio
from caption_io import metadata as metadata_lib
from caption_io import vocab as vocab_lib
from pipelines import shards

STATS_FILE = datadir.STATS_FILE  # the data directory's name for it, readable through this module too


def planned_split(shards_: int, pattern: str) -> metadata_lib.Split:
    """A split as the launcher plans it: its shards. Its counts, longest caption and
    shard list are placeholders, each replaced by WriteMetadata."""
    nothing = metadata_lib.Counts(seen=0, written=0, rejected=0)
    return metadata_lib.Split(shards=shards_, pattern=pattern, images=nothing, captions=nothing, max_tokens=0,
                              files=())


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

    def __init__(self, output: str, static: metadata_lib.Metadata):
        self._output = output
        self._static = static

    def process(self, _, tokens, channel_stats, counts, summaries, rejects_written=()):
        # rejects_written: the rejects sink's files, a side input only so that this runs after it.
        if channel_stats is None:
            raise RuntimeError("no training image was written, so there are no feature statistics "
                               f"(see the {datadir.folder(datadir.REJECTED)} records)")
        vocab_lib.write(fileio.join(self._output, datadir.VOCAB_FILE), tokens)
        buf = io.BytesIO()
        np.savez(buf, mean=channel_stats["mean"], std=channel_stats["std"], count=np.int64(channel_stats["count"]))
        fileio.write_bytes(fileio.join(self._output, datadir.STATS_FILE), buf.getvalue())
        static = self._static
        splits = {}
        for split, planned in static.splits.items():
            got = {}
            for what in ("images", "captions"):
                c = got[what] = metadata_lib.Counts(**{k.name: int(counts.get((split, what, k.name), 0))
                                                       for k in dataclasses.fields(metadata_lib.Counts)})
                if c.seen != c.written + c.rejected:
                    raise RuntimeError(f"{split} {what}: seen {c.seen} != written {c.written} "
                                       f"+ rejected {c.rejected}: an input was lost")
            mine = sorted((s for s in summaries if s["split"] == split), key=lambda s: s["name"])
            if len(mine) != planned.shards:
                raise RuntimeError(f"{split}: {len(mine)} shards written, {planned.shards} planned")
            # What each shard must hold: a later reader can check a copy against it.
            files = tuple(metadata_lib.ShardFile(name=s["name"], records=s["records"], bytes=s["bytes"],
                                                 sha256=s["sha256"]) for s in mine)
            splits[split] = dataclasses.replace(planned, **got, files=files,
                                                max_tokens=max((s["max_tokens"] for s in mine), default=0))
        meta = dataclasses.replace(
            static, splits=splits, vocab=dataclasses.replace(static.vocab, size=len(tokens)),
            features=dataclasses.replace(static.features, stats_count=int(channel_stats["count"])))
        # Whatever a failed attempt (a retried bundle) left behind goes before the run is declared done.
        shards.remove_leftovers(self._output)
        metadata_lib.write(self._output, meta)
        yield meta
