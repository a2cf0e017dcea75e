"""The first, cheap pass: captions tokenised, images read and decoded, before
any encoder work. Its output fixes what will be written, so the vocabulary can
be counted over exactly those captions while no pixels are held anywhere."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines import sources
from pipelines.transforms import NAMESPACE


def describe(entry) -> dict:
    return {"image_id": entry["image_id"], "file_name": entry["file_name"], "path": entry["path"]}


def read_image(path: str):
    """(file bytes, uint8 [H, W, 3] pixels, None) or (None, None, reason) for an image file:
    the one list of reasons an image is refused, for preprocessing and batch captioning alike."""
    from apache_beam.io.filesystems import FileSystems

    from caption_io import images

    try:
        with FileSystems.open(path) as f:
            data = f.read()
        return data, images.decode(data), None
    except images.ImageError as e:
        return None, None, str(e)
    except (OSError, IOError, beam.io.filesystem.BeamIOError) as e:
        return None, None, f"missing or unreadable file ({type(e).__name__}: {str(e)[:200]})"


def read_pixels(entry):
    """(uint8 [H, W, 3] pixels, None) or (None, reason) for an entry's image file."""
    _, pixels, reason = read_image(entry["path"])
    return pixels, reason


def image_reject(entry, reason) -> dict:
    """A reject for an image (and with it all its captions), counted."""
    Metrics.counter(NAMESPACE, "images_rejected").inc()
    Metrics.counter(NAMESPACE, "captions_rejected").inc(len(entry["captions"]))
    return sources.reject(entry["split"], "image",
                          dict(describe(entry), captions=[c["text"] for c in entry["captions"]]),
                          reason, images=1, captions=len(entry["captions"]))


class TokenizeCaptions(beam.DoFn):
    """Batches of manifest entries -> entries whose captions carry their words.

    Captions with no words after normalisation are rejected; an image left with
    no caption is rejected before it costs an image read.
    """

    def setup(self):
        from caption_io import text  # TensorFlow import: once per worker, not at pipeline build

        self._words = text.words

    def process(self, batch):
        texts = [c["text"] for e in batch for c in e["captions"]]
        all_words = iter(self._words(texts))
        for entry in batch:
            kept = []
            for cap in entry["captions"]:
                words = next(all_words)
                if words:
                    kept.append(dict(cap, words=words))
                else:
                    Metrics.counter(NAMESPACE, "captions_rejected").inc()
                    yield beam.pvalue.TaggedOutput("rejected", sources.reject(
                        entry["split"], "caption",
                        {"id": cap["id"], "image_id": entry["image_id"], "caption": cap["text"]},
                        "blank caption (no words after normalisation)", captions=1))
            if kept:
                yield dict(entry, captions=kept)
            else:
                Metrics.counter(NAMESPACE, "images_rejected").inc()
                yield beam.pvalue.TaggedOutput("rejected", sources.reject(
                    entry["split"], "image", describe(entry), "no usable caption", images=1))


class CheckImage(beam.DoFn):
    """Entry -> the same entry if its image decodes, else a reject with the reason.

    Decoding is a small share of an encoder pass; the pixels are dropped at once
    and read again by the encode pass, so nothing image-sized waits for the
    vocabulary.
    """

    def process(self, entry):
        _, reason = read_pixels(entry)
        if reason is None:
            yield entry
        else:
            yield beam.pvalue.TaggedOutput("rejected", image_reject(entry, reason))


class CheckInputs(beam.PTransform):
    """Manifest entries -> {"ok": usable entries with tokenised captions,
    "rejected": rejects with their reasons}."""

    def expand(self, entries):
        tokenized = (entries
                     | "BatchText" >> beam.BatchElements(min_batch_size=64, max_batch_size=512)
                     | "Tokenize" >> beam.ParDo(TokenizeCaptions()).with_outputs("rejected", main="ok"))
        checked = tokenized.ok | "CheckImage" >> beam.ParDo(CheckImage()).with_outputs("rejected", main="ok")
        rejected = (tokenized.rejected, checked.rejected) | "Rejected" >> beam.Flatten()
        return {"ok": checked.ok, "rejected": rejected}
