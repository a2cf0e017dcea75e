"""Loading an exported SavedModel and calling it: the one client the `caption` command,
evaluation and the benchmarks share (caption_io/savedmodel.py has the contract)."""
from __future__ import annotations

import json
import os

from caption_io import cli, savedmodel, vocab


class ModelError(ValueError, cli.UserError):
    """A --model that cannot be used; str() is the reason."""


def load_model(path: str):
    """-> (the loaded SavedModel, export.json's {default_beam_size, default_max_length, ...})."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(path):
        raise ModelError("no such directory")
    if not any(tf.io.gfile.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise ModelError("not a SavedModel (no saved_model.pb; pass the export directory, e.g. JOB_DIR/export)")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelError(f"cannot load the SavedModel ({str(e).strip().splitlines()[0]})") from None
    if savedmodel.CAPTION_IMAGES not in loaded.signatures:
        raise ModelError(f"not a captioner export (no {savedmodel.CAPTION_IMAGES} signature)")
    info_path = os.path.join(path, savedmodel.EXPORT_INFO)
    info = json.loads(tf.io.gfile.GFile(info_path).read()) if tf.io.gfile.exists(info_path) else {}
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
