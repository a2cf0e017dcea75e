"""The vocabulary, counted over the checked training captions."""
from __future__ import annotations

import apache_beam as beam

from caption_io import vocab as vocab_lib


def _train_words(entry):
    if entry["split"] == "train":
        for cap in entry["captions"]:
            yield from cap["words"]


class BuildVocabulary(beam.PTransform):
    """Checked entries (any split; only train counts) -> a one-element
    PCollection: the vocabulary's tokens in id order (vocab.select_words)."""

    def __init__(self, max_words: int, min_count: int = 1):
        super().__init__()
        self._max_words = max_words
        self._min_count = min_count

    def expand(self, entries):
        return (entries
                | "Words" >> beam.FlatMap(_train_words)
                | "CountWords" >> beam.combiners.Count.PerElement()
                | "AllCounts" >> beam.combiners.ToDict()
                | "SelectWords" >> beam.Map(vocab_lib.select_words, self._max_words, self._min_count))
