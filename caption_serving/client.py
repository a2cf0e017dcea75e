"""Loading an exported SavedModel and calling it: the one client the `caption` command,
Beam batch captioning, evaluation and the benchmarks share (caption_io/savedmodel.py has the contract)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from caption_io import cli, fileio, savedmodel, vocab

# Formats TensorFlow's decode_image reads the same way PIL does: these bytes go to the
# model untouched, so a caption here equals the SavedModel's for the same file. BMP is
# left out on purpose: TF misreads palette BMPs without an error.
TF_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}


class ModelError(ValueError, cli.UserError):
    """A --model that cannot be used; str() is the reason."""


def export_info(path: str) -> dict:
    """Check that `path` holds a SavedModel without loading it, and return export.json's
    {default_beam_size, default_max_length, ...} ({} for an export without one): what a
    launcher checks before it starts workers that will load the model."""
    if not (fileio.exists(path) if fileio.is_gcs(path) else os.path.isdir(path)):
        raise ModelError("no such directory")
    if not any(fileio.exists(fileio.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise ModelError("not a SavedModel (no saved_model.pb; pass the export directory, e.g. JOB_DIR/export)")
    info_path = fileio.join(path, savedmodel.EXPORT_INFO)
    return fileio.read_json(info_path) if fileio.exists(info_path) else {}


def load_model(path: str):
    """-> (the loaded SavedModel, export.json's content as export_info gives it)."""
    import tensorflow as tf

    info = export_info(path)
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelError(f"cannot load the SavedModel ({str(e).strip().splitlines()[0]})") from None
    if savedmodel.CAPTION_IMAGES not in loaded.signatures:
        raise ModelError(f"not a captioner export (no {savedmodel.CAPTION_IMAGES} signature)")
    return loaded, info


def rows(out: dict) -> list[dict]:
    """A signature's batch output (numpy) -> per image {"caption", "score", "words",
    "attention" [len(words), POSITIONS]}: the caption's words are exactly its tokens that
    are words (vocab.is_word), in order, so their attention rows line up with them."""
    found = []
    for i, text in enumerate(out[savedmodel.CAPTIONS]):
        caption = text.decode("utf-8")
        words = caption.split()
        attention = out[savedmodel.ATTENTION][i][vocab.is_word(out[savedmodel.TOKENS][i])]
        assert len(words) == len(attention), (caption, out[savedmodel.TOKENS][i])
        found.append({"caption": caption, "score": float(out[savedmodel.SCORES][i]), "words": words,
                      "attention": attention})
    return found


def caption_batch(loaded, blobs: list[bytes], beam_size: int, max_length: int) -> list[dict]:
    """Caption image bytes with the caption_images signature; per image as `rows` gives."""
    import tensorflow as tf

    # `loaded` is passed, not just its signature: a signature outliving its object loses the variables.
    out = loaded.signatures[savedmodel.CAPTION_IMAGES](**{
        savedmodel.IMAGES: tf.constant(blobs), savedmodel.BEAM_SIZE: tf.constant(beam_size, tf.int32),
        savedmodel.MAX_LENGTH: tf.constant(max_length, tf.int32)})
    return rows({k: v.numpy() for k, v in out.items()})


def caption_features(loaded, features, beam_size: int, max_length: int) -> list[dict]:
    """Caption stored feature maps [B, POSITIONS, CHANNELS] with the caption_features signature."""
    import tensorflow as tf

    out = loaded.signatures[savedmodel.CAPTION_FEATURES](**{
        savedmodel.FEATURES: tf.cast(features, tf.float32), savedmodel.BEAM_SIZE: tf.constant(beam_size, tf.int32),
        savedmodel.MAX_LENGTH: tf.constant(max_length, tf.int32)})
    return rows({k: v.numpy() for k, v in out.items()})


def model_bytes(data: bytes, pixels: np.ndarray) -> bytes:
    """The bytes to give the SavedModel: the file itself when TensorFlow reads it, else a
    PNG of the pixels PIL decoded (TIFF, palette BMP, ...)."""
    import tensorflow as tf

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
    if fmt in TF_FORMATS:
        try:
            # Cheap next to the encoder, and one file TF rejects would fail the whole batch.
            tf.io.decode_image(data, channels=3, expand_animations=False)
            return data
        except tf.errors.InvalidArgumentError:
            pass
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
