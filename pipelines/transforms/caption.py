"""Batch captioning's transforms: image paths -> captions through the exported SavedModel.

    ReadImages     path -> (path, bytes the SavedModel reads) | a reject with its reason
    CaptionHandler Beam's RunInference model handler for the export (tf.saved_model.load)
    CaptionImages  paths -> {"captioned": result rows, "rejected": rejects}

Beam's own TensorFlow handlers load a SavedModel through Keras, which under Keras 3 reads
only .keras files (apache/beam#30616); this export is a plain SavedModel of tf.functions,
so the handler here loads it the way every other client does (caption_serving.client).
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base

from pipelines.transforms import NAMESPACE, check

log = logging.getLogger("pipelines.caption_images")


def reject(path: str, reason: str) -> dict:
    Metrics.counter(NAMESPACE, "images_rejected").inc()
    return {"image": path, "reason": reason}


class ReadImages(beam.DoFn):
    """path -> (path, image bytes for the model), or a tagged reject.

    Every image is decoded here once (the reasons are preprocessing's: not an image,
    truncated, over the pixel cap, unreadable), so no bad file reaches a model batch.
    Formats TensorFlow does not read as PIL does go to the model as PNG.
    """

    def process(self, path):
        from caption_serving import client

        data, pixels, reason = check.read_image(path)
        if reason is not None:
            yield beam.pvalue.TaggedOutput("rejected", reject(path, reason))
            return
        yield path, client.model_bytes(data, pixels)


class CaptionHandler(base.ModelHandler):
    """Image bytes -> {"caption", "score"[, "captions"]} rows, through the export's caption_images signature.

    model_copies=None keeps one model per worker process, shared by its threads (CPU
    workers: a process per core, each using its core); model_copies=N loads N per worker
    machine, shared by all its processes (GPU workers: one or two per GPU). encoder_precision:
    auto, float32 or bfloat16, decided where the model is loaded (caption_serving.reencode);
    None encodes as the export does.
    """

    def __init__(self, model_dir: str, beam_size: int, max_length: int, batch_size: int,
                 model_copies: int | None = None, controls: dict | None = None, encoder_precision: str | None = None):
        # Batches of exactly batch_size (a bundle's last may be smaller): Beam's adaptive
        # batching would start at one image a call and grow, which wastes a CPU model's first calls.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size, model_copies=model_copies)
        self._model_dir = model_dir
        self._beam_size = beam_size
        self._max_length = max_length
        self._controls = dict(controls or {})  # decoding's controls (client.caption_batch)
        self._encoder_precision = encoder_precision

    def load_model(self):
        from caption_serving import client

        t = time.time()
        loaded, info = client.load_model(self._model_dir)
        if self._encoder_precision is not None:
            from caption_serving import reencode

            loaded, choice = reencode.at_precision(loaded, info, self._model_dir, self._encoder_precision)
            log.info("the image encoder computes in %s", choice.describe())
        log.info("model loaded in %.1fs: %s", time.time() - t, self._model_dir)
        return loaded

    def run_inference(self, batch, model, inference_args=None):
        """One model call for the batch. Should it fail on an image that the checks let
        through, each image is captioned alone, so only that one is lost (as an error row)."""
        import tensorflow as tf

        from caption_serving import client

        blobs = list(batch)
        try:
            rows = client.caption_batch(model, blobs, self._beam_size, self._max_length, **self._controls)
        except tf.errors.InvalidArgumentError:
            rows = []
            for blob in blobs:
                try:
                    rows.extend(client.caption_batch(model, [blob], self._beam_size, self._max_length,
                                                     **self._controls))
                except tf.errors.InvalidArgumentError as e:
                    rows.append({"error": f"the model cannot read it ({e.message.strip().splitlines()[0]})"})
        return [base.PredictionResult(blob, self._result(r)) for blob, r in zip(blobs, rows)]

    def _result(self, row: dict) -> dict:
        """What travels on from a client row: the caption and score, the n-best when more than
        one caption was asked for (no attention: the JSON lines do not carry it), or the error."""
        out = {k: row[k] for k in ("caption", "score", "error") if k in row}
        if self._controls.get("num_captions", 1) > 1 and "nbest" in row:
            out["captions"] = [{"caption": n["caption"], "score": round(n["score"], 6)} for n in row["nbest"]]
        return out

    def get_num_bytes(self, batch) -> int:
        return sum(len(b) for b in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class _Progress(beam.DoFn):
    """(path, PredictionResult) -> a result row or a tagged reject; counts and, on a long
    local run, a progress line every 15 s."""

    def setup(self):
        self._count = 0
        self._start = self._last = time.time()

    def process(self, keyed):
        path, result = keyed
        if "error" in result.inference:
            yield beam.pvalue.TaggedOutput("rejected", reject(path, result.inference["error"]))
            return
        Metrics.counter(NAMESPACE, "images_captioned").inc()
        self._count += 1
        now = time.time()
        if now - self._last > 15:
            self._last = now
            log.info("captioned %d images in this worker (%.1f images/s)", self._count,
                     self._count / (now - self._start))
        row = {"image": path, "caption": result.inference["caption"], "score": round(result.inference["score"], 6)}
        if "captions" in result.inference:
            row["captions"] = result.inference["captions"]
        yield row


class CaptionImages(beam.PTransform):
    """Image paths -> {"captioned": {"image", "caption", "score"} rows, "rejected": {"image", "reason"}}."""

    def __init__(self, handler: CaptionHandler):
        super().__init__()
        self._handler = handler

    def expand(self, paths):
        from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

        read = paths | "Read" >> beam.ParDo(ReadImages()).with_outputs("rejected", main="ok")
        results = read.ok | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
        rows = results | "Rows" >> beam.ParDo(_Progress()).with_outputs("rejected", main="ok")
        rejected = (read.rejected, rows.rejected) | "Rejected" >> beam.Flatten()
        return {"captioned": rows.ok, "rejected": rejected}
