"""The vocabulary, counted over the checked training captions' words and made into tokens
in the data's mode (caption_io.tokenizer: the words, their characters or learned word pieces)."""
from __future__ import annotations

import apache_beam as beam


def _train_words(entry):
    if entry["split"] == "train":
        for cap in entry["captions"]:
            yield from cap["words"]


class BuildVocabulary(beam.PTransform):
    """Checked entries (any split; only train counts) -> a one-element
    PCollection: the vocabulary's tokens in id order (tokenizer.vocabulary)."""

    def __init__(self, mode: str, max_words: int, min_count: int = 1):
        super().__init__()
        self._mode = mode
        self._max_words = max_words
        self._min_count = min_count

    def expand(self, entries):
        return (entries
                | "Words" >> beam.FlatMap(_train_words)
                | "CountWords" >> beam.combiners.Count.PerElement()
                | "AllCounts" >> beam.combiners.ToDict()
                | "SelectTokens" >> beam.Map(_tokens, self._mode, self._max_words, self._min_count))


def _tokens(counts: dict, mode: str, max_words: int, min_count: int) -> list[str]:
    from caption_io import tokenizer  # TensorFlow import: on the worker, not at pipeline build

    return tokenizer.vocabulary(counts, mode, max_words, min_count)
