"""Loading an exported SavedModel and calling it: the one client the `caption` command,
Beam batch captioning, evaluation and the benchmarks share (caption_io/savedmodel.py has the contract)."""
from __future__ import annotations

import io
import logging
import os
import typing
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image

from caption_io import cli, decoding_defaults, fileio, savedmodel, vocab

# Formats TensorFlow's decode_image reads the same way PIL does: these bytes go to the
# model untouched, so a caption here equals the SavedModel's for the same file. BMP is
# left out on purpose: TF misreads palette BMPs without an error.
TF_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}


class ModelError(ValueError, cli.UserError):
    """A --model that cannot be used; str() is the reason."""


class Captioner(typing.Protocol):
    """What caption_batch and caption_features call: `signatures` maps signature names
    (caption_io/savedmodel.py) to functions that take the signature's inputs by name and return
    its outputs. A loaded export (load_model's) is one; so is a CaptionFunctions."""

    signatures: Mapping[str, Callable[..., dict]]


class CaptionFunctions:
    """A Captioner made of functions rather than loaded from an export: each is a tf.function
    with its signature's input_signature (the trainer's caption_features around the model in
    training), given by signature name."""

    def __init__(self, signatures: Mapping[str, Callable[..., dict]]):
        self.signatures = dict(signatures)


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
    loader_log = logging.getLogger("absl")  # TensorFlow's SavedModel loader logs through absl
    loader_log.addFilter(_no_gradient_warning)
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelError(f"cannot load the SavedModel ({str(e).strip().splitlines()[0]})") from None
    finally:
        loader_log.removeFilter(_no_gradient_warning)
    if savedmodel.CAPTION_IMAGES not in loaded.signatures:
        raise ModelError(f"not a captioner export (no {savedmodel.CAPTION_IMAGES} signature)")
    return loaded, info


def _no_gradient_warning(record: logging.LogRecord) -> bool:
    """Leave out the loader's warning that a function has "unsaved custom gradients": exports
    leave the encoders' activation gradients out on purpose (export.SAVE_OPTIONS), and
    captioning takes no gradient."""
    return "unsaved custom gradients" not in record.getMessage()


# Decoding's settings beside beam_size and max_length (caption_io/savedmodel.py: OPTIONS), at
# their defaults: an export whose signatures do not take them decodes with these values.
CONTROL_DEFAULTS = {savedmodel.NUM_CAPTIONS: decoding_defaults.NUM_CAPTIONS,
                    savedmodel.NO_REPEAT_NGRAM: decoding_defaults.NO_REPEAT_NGRAM,
                    savedmodel.MIN_LENGTH: decoding_defaults.MIN_LENGTH,
                    savedmodel.LENGTH_ALPHA: decoding_defaults.LENGTH_ALPHA}


def option_inputs(beam_size: int, max_length: int, **controls) -> dict:
    """The option signatures' scalar inputs as tensors: beam_size, max_length and each control
    (CONTROL_DEFAULTS for those not given)."""
    import tensorflow as tf

    unknown = set(controls) - set(CONTROL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown decoding option(s): {', '.join(sorted(unknown))}")
    values = dict(CONTROL_DEFAULTS, **{k: v for k, v in controls.items() if v is not None},
                  **{savedmodel.BEAM_SIZE: beam_size, savedmodel.MAX_LENGTH: max_length})
    return {k: tf.constant(values[k], tf.float32 if k == savedmodel.LENGTH_ALPHA else tf.int32)
            for k in savedmodel.OPTIONS}


def _input_names(fn) -> set[str]:
    """The names a signature (or a tf.function with an input signature) is called with."""
    args, kwargs = fn.structured_input_signature if hasattr(fn, "structured_input_signature") \
        else fn.get_concrete_function().structured_input_signature
    return set(kwargs) | {spec.name for spec in args if getattr(spec, "name", None)}


def _call(fn, data_inputs: dict, beam_size: int, max_length: int, controls: dict) -> list[dict]:
    """Call an option signature with exactly the inputs it takes. An export whose signatures
    lack the decoding controls takes beam_size and max_length only: asking it for another value
    of a control is a ModelError saying to re-export; leaving them at their defaults works."""
    options = option_inputs(beam_size, max_length, **controls)
    takes = _input_names(fn)
    missing = [k for k in controls if k not in takes and controls[k] not in (None, CONTROL_DEFAULTS[k])]
    if missing:
        raise ModelError(f"this export cannot take {', '.join(missing)} (it was made before the decoding "
                         "controls; export the job again with python -m caption_serving.export)")
    out = fn(**data_inputs, **{k: v for k, v in options.items() if k in takes})
    return rows({k: v.numpy() for k, v in out.items()})


def rows(out: dict) -> list[dict]:
    """A signature's batch output (numpy) -> per image {"caption", "score", "words",
    "attention" [len(words), POSITIONS], "nbest": [...]}: "words" are the text of the caption's
    tokens that are words (vocab.is_word; a word piece is one, labelled "-dish"), in order, so
    their attention rows line up with them.
    "nbest" (with the option signatures) holds the num_captions best captions, best first, each
    a dict of the same four keys; the first is the caption itself."""
    best, nbest = savedmodel.BEST, savedmodel.NBEST
    found = []
    for i in range(len(out[best.captions])):
        found.append(_row(out, best, i))
        if nbest.captions in out:
            found[-1]["nbest"] = [_row(out, nbest, i, k) for k in range(out[nbest.captions].shape[1])
                                  if out[nbest.lengths][i][k] > 0]  # length 0: an empty place
    return found


def _row(out: dict, names: savedmodel.Outputs, *at: int) -> dict:
    """One caption of a batch output: the family `names`' values at image `at[0]` (and place `at[1]`)."""
    def value(name):
        found = out[name]
        for i in at:  # one index at a time: a column may be a list (rest.rows_of's captions)
            found = found[i]
        return found

    caption = value(names.captions).decode("utf-8")
    tokens = value(names.tokens)
    is_word = vocab.is_word(tokens)
    if names.token_text in out:
        words = [_text(t) for t, w in zip(value(names.token_text), is_word) if w]
    else:  # an export made before token_text: its captions are words joined by spaces
        words = caption.split()
    attention = value(names.attention)[is_word]
    assert len(words) == len(attention), (caption, tokens)
    return {"caption": caption, "score": float(value(names.scores)), "words": words, "attention": attention}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def caption_batch(loaded: Captioner, blobs: list[bytes], beam_size: int, max_length: int, **controls) -> list[dict]:
    """Caption image bytes with the caption_images signature; per image as `rows` gives.
    controls: num_captions, no_repeat_ngram, min_length, length_alpha (CONTROL_DEFAULTS)."""
    import tensorflow as tf

    # `loaded` is passed, not just its signature: a signature outliving its object loses the variables.
    return _call(loaded.signatures[savedmodel.CAPTION_IMAGES], {savedmodel.IMAGES: tf.constant(blobs)},
                 beam_size, max_length, controls)


def caption_features(loaded: Captioner, features, beam_size: int, max_length: int, **controls) -> list[dict]:
    """Caption stored feature maps [B, POSITIONS, CHANNELS] with the caption_features signature."""
    import tensorflow as tf

    return _call(loaded.signatures[savedmodel.CAPTION_FEATURES], {savedmodel.FEATURES: tf.cast(features, tf.float32)},
                 beam_size, max_length, controls)


def add_decoding_flags(parser) -> None:
    """The decoding controls as command-line flags (caption, caption_images), defined once."""
    g = parser.add_argument_group("decoding")
    d = decoding_defaults
    g.add_argument("--num-captions", type=int, default=d.NUM_CAPTIONS, help="the N best captions of the beam, "
                   f"best first (at most --beam-size; default {d.NUM_CAPTIONS})")
    g.add_argument("--no-repeat-ngram", type=int, default=d.NO_REPEAT_NGRAM, metavar="N",
                   help=f"never generate the same N-gram twice in a caption (default {d.NO_REPEAT_NGRAM}: off)")
    g.add_argument("--min-length", type=int, default=d.MIN_LENGTH,
                   help=f"no <end> before this many tokens (default {d.MIN_LENGTH})")
    g.add_argument("--length-alpha", type=float, default=d.LENGTH_ALPHA,
                   help=f"beam search's length normalisation ((5 + n) / 6)^alpha (default {d.LENGTH_ALPHA}; 0: none)")


def decoding_controls(args, beam_size: int) -> dict:
    """The controls from add_decoding_flags' flags, checked: {name: value} for caption_batch.
    Raises ValueError with the flag's name on a bad value."""
    if not 1 <= args.num_captions <= beam_size:
        raise ValueError(f"--num-captions must be between 1 and --beam-size ({beam_size}), got {args.num_captions}")
    for flag, value in (("--no-repeat-ngram", args.no_repeat_ngram), ("--min-length", args.min_length),
                        ("--length-alpha", args.length_alpha)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    return {savedmodel.NUM_CAPTIONS: args.num_captions, savedmodel.NO_REPEAT_NGRAM: args.no_repeat_ngram,
            savedmodel.MIN_LENGTH: args.min_length, savedmodel.LENGTH_ALPHA: args.length_alpha}


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
