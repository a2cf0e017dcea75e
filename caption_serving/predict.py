"""The served export and the predict work both of caption-serve's APIs share (REST in
caption_serving/serve.py, gRPC in caption_serving/grpc_api.py): what one request may cost, its
inputs checked before they can fail a batch they would share, one model call through the batcher,
and its outputs trimmed so that a request's answer does not depend on who shared its batch."""
from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from caption_io import cli, geometry, images, savedmodel, tokenizer, vocab
from caption_serving import rest
from caption_serving.client import CONTROL_DEFAULTS, model_bytes

log = logging.getLogger(__name__)

class ServeError(ValueError, cli.UserError):
    """A flag or an address the server cannot use; str() is the reason."""


VERSION = "1"                # an export directory is one version: TF Serving would call it 1


@dataclass(frozen=True)
class Limits:
    """What one request may cost: its body, each image's pixels, the seconds it may wait for the
    model (queue included), and the most images one model call takes."""

    max_body_bytes: int = 32 * 2**20   # a 20 MiB image is 27 MiB as base64
    max_pixels: int = images.MAX_PIXELS
    timeout: float = 60.0
    max_batch: int = 16


class Served:
    """The loaded export as the server needs it: each signature's inputs, and the call. `path`,
    the export's directory, is where the metadata's signature defs are read (None: no metadata)."""

    def __init__(self, loaded, info: dict, name: str = "captioner", path: str | None = None):
        self.loaded, self.info, self.name, self.path = loaded, info, name, path
        self.specs = {sig: {k: rest.Spec.of(v) for k, v in fn.structured_input_signature[1].items()}
                      for sig, fn in loaded.signatures.items()}

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One model call (the batcher's worker thread makes them, one at a time)."""
        import tensorflow as tf

        specs = self.specs[signature]
        out = self.loaded.signatures[signature](**{k: tf.constant(v, dtype=tf.as_dtype(specs[k].dtype))
                                                   for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}

    def batched(self, signature: str) -> frozenset[str]:
        return frozenset(k for k, s in self.specs[signature].items() if s.batched)

    def page_config(self, limits: Limits) -> dict:
        """What the page needs to know: the endpoint, the defaults, the limits, what the export takes."""
        return {"model": self.name, "predict": f"/v1/models/{self.name}:predict",
                "signature": savedmodel.CAPTION_IMAGES,
                "beam_size": savedmodel.export_beam_size(self.info),
                "max_length": savedmodel.export_max_length(self.info),
                "num_captions": savedmodel.NUM_CAPTIONS in self.specs[savedmodel.CAPTION_IMAGES],
                # The decoding controls the page does not offer go at decoding's defaults (a
                # signature's every input must be sent; older exports take none of them).
                "fixed": {k: v for k, v in CONTROL_DEFAULTS.items()
                          if k in self.specs[savedmodel.CAPTION_IMAGES] and k != savedmodel.NUM_CAPTIONS},
                "max_body_bytes": limits.max_body_bytes, "max_pixels": limits.max_pixels,
                "first_word_id": vocab.FIRST_WORD_ID,
                "piece_label": tokenizer.PIECE_LABEL,  # marks a token that continues its word
                # The encoder's grid of cells, [rows, columns]: the shape of a word's attention.
                "grid": list(geometry.of_encoder(self.info.get("encoder")).grid)}


def checked_inputs(inputs: dict[str, np.ndarray], limits: Limits) -> dict[str, np.ndarray]:
    """A request's inputs (either API's), the options and images checked: the images decoded
    and passed on as client.model_bytes gives them. Raises a RestError (rest.OverLimit) saying why."""
    for name in (savedmodel.BEAM_SIZE, savedmodel.MAX_LENGTH, savedmodel.NUM_CAPTIONS):
        if name in inputs and (inputs[name] < 1).any():
            raise rest.RestError(f"{name} must be at least 1")
    blobs = inputs.get(savedmodel.IMAGES)
    if blobs is not None and blobs.size == 0:  # the export's encoder cannot run an empty batch
        raise rest.RestError("no images in the request")
    if blobs is not None and blobs.dtype == object:
        checked = [checked_image(b, i, limits.max_pixels) for i, b in enumerate(blobs.reshape(-1))]
        inputs[savedmodel.IMAGES] = np.array(checked, dtype=object).reshape(blobs.shape)
    return inputs


def checked_image(data: bytes, index: int, max_pixels: int) -> bytes:
    """Image bytes the SavedModel will read (client.model_bytes), or a RestError naming the
    image and what is wrong with it. The pixel cap is read from the header, before decoding."""
    with contextlib.suppress(OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise rest.OverLimit(f"images[{index}]: image too large ({img.width}x{img.height} pixels, "
                                     f"the cap is {max_pixels})")
    try:
        return model_bytes(data, images.decode(data))
    except images.ImageError as e:  # not an image, truncated, empty: decode says which
        raise rest.RestError(f"images[{index}]: {e}") from None


def trimmed(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokens, their text and attention (and their n-best) cut to the request's own longest caption. A batch
    pads them to its longest hypothesis, so without the cut a request's answer would depend on
    who shared its batch; with it, the same request gets the same answer however it was batched
    (TF Serving's answer can have more trailing <pad> columns: `lengths` says where each caption ends)."""
    out = dict(out)
    for names, ndim in ((savedmodel.BEST, 1), (savedmodel.NBEST, 2)):
        lengths, tokens, attention = (out.get(k) for k in (names.lengths, names.tokens, names.attention))
        if lengths is None or tokens is None or attention is None or lengths.ndim != ndim \
                or tokens.ndim != ndim + 1:
            continue
        steps = int(lengths.max()) if lengths.size else 0
        out[names.tokens] = tokens[..., :steps]
        out[names.attention] = attention[..., :steps, :]
        if names.token_text in out:  # exports made before it lack it
            out[names.token_text] = out[names.token_text][..., :steps]
    return out


async def answer(batcher, served: Served, limits: Limits, signature: str, inputs: dict[str, np.ndarray],
                 start: float) -> dict[str, np.ndarray]:
    """Checked inputs -> their outputs, trimmed: both APIs' model call, through the one batcher, within
    --timeout of `start` (time.monotonic()). A failed call's RestError has the model's error as __cause__."""
    left = limits.timeout - (time.monotonic() - start)
    try:
        out = await batcher.submit(signature, inputs, served.batched(signature), max(left, 0.0))
    except TimeoutError:
        raise rest.RestError(f"no answer within {limits.timeout:g} s (--timeout)", 504) from None
    except Exception as e:
        raise model_error(e) from e
    return trimmed(out)


def model_error(e: Exception) -> rest.RestError:
    """A failed model call as TF Serving reports it: its argument errors are the request's (400)."""
    import tensorflow as tf

    message = cli.one_line(getattr(e, "message", None) or e)
    if isinstance(e, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError)):
        return rest.RestError(message, 400)
    log.error("model call failed", exc_info=e)
    return rest.RestError(f"internal error: {message}", 500)
