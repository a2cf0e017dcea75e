"""Convert an export into a LiteRT (TFLite) captioner for phones and edge devices: pixels in, token ids out.

    python -m caption_serving.litert --model EXPORT --output captioner.tflite
            [--beam-size K] [--max-length N] [--quantize none|float16|int8] [--data DATA_DIR]
            [--calibration-images IMG_OR_DIR...]

The file holds the export's image encoder and caption decoder, with their weights, and the
decoding loop as a builtin WHILE: builtin LiteRT ops only (no Flex delegate). Its one signature,
serving_default, takes
    pixels     uint8 [H, W, 3]    an RGB image of any size (resized and scaled inside, as the export does)
and returns the K hypotheses of a beam search, best first (row 0 is the caption):
    tokens     int32 [K, L]       token ids, <end> included, 0 after it
    lengths    int32 [K]          tokens, <end> included (0: a place no hypothesis filled)
    scores     float32 [K]        log-probabilities (0 for an empty place)
    attention  float32 [K, L, P]  each token's weights over the encoder's grid of P cells (row-major)
The beam size K is fixed in the file (--beam-size; default the export's default_beam_size; 1 is
greedy decoding, token for token), and so is L, the longest caption (--max-length; default the
export's default_max_length): a file is one decoding setting, and an app that wants greedy and
beam search ships two. Beam search ranks by length-normalised score with alpha 0.7. Beside the
file, OUTPUT's stem + .json holds the vocabulary ("tokens", position = id) and how the file
was made. How an app calls it: docs/serving.md, "On phones: LiteRT".

--quantize: none keeps float32 weights; float16 stores them as float16 (half the size); int8
stores those outside the decoding loop as int8 with a scale per channel and the loop's as float16
(about a quarter), the convolutions' rounded with the help of --calibration-images, a few images
like those the model will caption (16 are used; caption_serving/litert_int8.py says how). In all
three every computation is float32: stored weights are turned back into float32 once, when the
interpreter first runs the model.

Why the graph is built here and not converted from the SavedModel's signatures: those decode
JPEG bytes and spell captions with string ops (LiteRT has neither; an app decodes images and
holds strings anyway), and their decoding loop leaves every shape open (any batch, any beam),
which the converter cannot lower to builtins: the GRU's attention adds an axis to a tensor whose
sizes it then does not know, even with the beam size alone left open. Here the batch is one image
and the beam size a constant, so only the caption's length varies in the loop; the loop's body is
model/beam_search.py's own step, on the export's weights read into the same Keras models.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before TensorFlow is imported, below
    from caption_io import quiet

    quiet.install()

import dataclasses
import os
import sys

import tensorflow as tf

from caption_io import cli, fileio, images, jobdir, metadata, savedmodel
from caption_io.vocab import END_ID, START_ID
from caption_serving import client, litert_int8, litert_runner
from caption_serving.litert_runner import LiteRTError
from model import Captioner, CaptionerConfig, backbones
from model.beam_search import finished, loop_parts
from model.decoded import DEFAULT_ALPHA, Hypotheses

NONE, FLOAT16, INT8 = QUANTIZE = ("none", "float16", "int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class Parts:
    """An export's pieces, as Keras models with its weights: what the graph is traced from."""

    captioner: Captioner
    backbone: backbones.Backbone
    encoder: object  # the backbone's keras.Model
    tokens: list[str]
    info: dict       # export.json


def load_export(path: str, data_dir: str | None = None) -> Parts:
    """The export's captioner and encoder rebuilt from export.json's config and encoder record,
    with the SavedModel's own variables read into them (every one must match), and its
    vocabulary. A loaded SavedModel keeps only its traced signatures, which cannot be traced again
    with other shapes; the Keras models can."""
    try:
        info = client.export_info(path)
    except client.ModelError as e:
        raise LiteRTError(f"--model {path}: {e}") from None
    if "config" not in info:
        raise LiteRTError(f"--model {path}: no {savedmodel.EXPORT_INFO} with the model's config "
                          "(export the job again with python -m caption_serving.export)")
    config = CaptionerConfig.from_dict(info["config"])
    tokens = _vocabulary(path, info, config, data_dir)  # first: it fails in a moment, the models take seconds
    backbone = backbones.of_encoder(info.get("encoder"))
    captioner, encoder = Captioner(config), backbone.build("random")
    try:
        tf.train.Checkpoint(captioner=captioner, encoder=encoder).read(
            fileio.join(path, "variables", "variables")).assert_consumed()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise LiteRTError(f"--model {path}: its weights do not fit the model export.json describes "
                          f"({cli.one_line(e)[:160]})") from None
    return Parts(captioner, backbone, encoder, tokens, info)


def _vocabulary(path: str, info: dict, config: CaptionerConfig, data_dir: str | None) -> list[str]:
    """The export's vocabulary, from the data directory it was made from: the SavedModel holds
    its tokens only as constants inside its signatures' graphs."""
    try:
        data_dir = data_dir or jobdir.recorded_data(info, fileio.join(path, savedmodel.EXPORT_INFO), path)
    except jobdir.RecordedPathError as e:
        raise LiteRTError(f"the vocabulary is in the export's data directory: {e}") from None
    meta = metadata.read(data_dir)
    metadata.check_encoder(info.get("encoder"), meta, f"--model {path}", f"--data {data_dir}")
    tokens = metadata.load_vocab(data_dir, meta)
    if len(tokens) != config.vocab_size:
        raise LiteRTError(f"--data {data_dir}: a vocabulary of {len(tokens)} tokens, the model has {config.vocab_size}")
    return tokens


# ------------------------------------------------------------------------------------- the graph
def caption_function(parts: Parts, beam_size: int, max_length: int):
    """The tf.function the file is converted from: one image -> its beam's hypotheses, best
    first, padded to max_length tokens (the module docstring's outputs)."""
    captioner, backbone, encoder = parts.captioner, parts.backbone, parts.encoder

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="pixels")])
    def caption(pixels):
        features = encoder(backbone.prepare(pixels[None]), training=False)
        return _outputs(_beam_search(captioner, features, beam_size, max_length), beam_size, max_length)
    return caption


def _beam_search(model: Captioner, features, k: int, max_length: int) -> Hypotheses:
    """model/beam_search.py's search for one image, its k hypotheses in the finished set's order.

    The same start, step and stopping rule; only the loop's shapes differ: every size but the
    growing caption's stays as traced (search() leaves them all open, and the converter cannot
    lower a slice that adds an axis to a tensor with two unknown sizes)."""
    parts = loop_parts(model, features, k, 1, tf.constant(max_length), DEFAULT_ALPHA, START_ID, END_ID)
    # A size 0 at the start is the caption so far, which grows. The decoder's state changes as
    # the decoder says, but for its batch (k beams here), which stays.
    state = parts.variables[2]
    state_shapes = tf.nest.map_structure(lambda shape, x: x.shape[:1].concatenate(shape[1:]),
                                         parts.state_invariants, state)
    shapes = tuple(state_shapes if v is state else
                   tf.TensorShape([None if d == 0 else d for d in v.shape]) for v in parts.variables)
    out = tf.while_loop(parts.cond, parts.body, parts.variables, shape_invariants=shapes,
                        maximum_iterations=max_length)
    return finished(out)


def _outputs(found: Hypotheses, k: int, max_length: int) -> dict:
    """The finished set of one image -> the signature's outputs, T padded to max_length so that
    every output has a fixed shape. An empty place scores 0 rather than -inf, as the export's
    n-best outputs do."""
    pad = max_length - tf.shape(found.tokens)[2]
    positions = found.attention.shape[-1]
    lengths = tf.reshape(found.lengths, [k])
    return {"tokens": tf.reshape(tf.pad(found.tokens[0], [[0, 0], [0, pad]]), [k, max_length]),
            "lengths": lengths,
            "scores": tf.where(lengths > 0, tf.reshape(found.scores, [k]), 0.0),
            "attention": tf.reshape(tf.pad(found.attention[0], [[0, 0], [0, pad], [0, 0]]),
                                    [k, max_length, positions])}


# ---------------------------------------------------------------------------------- converting
def convert(parts: Parts, beam_size: int, max_length: int, quantize: str = NONE,
            calibration: litert_int8.Calibration | None = None) -> bytes:
    """The LiteRT flatbuffer, checked to hold builtin ops only and its weights as constants.

    quantize: none (float32), float16 (weights stored as float16) or int8 (convolutions' and
    fully-connected layers' weights stored as int8 outside the decoding loop, rounded with
    `calibration`'s images, and as float16 inside it); every computation is float32 in all three."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize == INT8 and calibration is None:
        raise ValueError("int8 weights are rounded with calibration images: pass a litert_int8.Calibration")
    function = caption_function(parts, beam_size, max_length)
    # The converter freezes the tf.Variables it finds on this object. Given the Keras models
    # instead, TF 2.21 keeps Keras 3's variables as resource variables with no initial value:
    # a file without its weights, a few hundred KB.
    holder = tf.Module()
    holder.weights = [v.value for v in parts.captioner.variables + parts.encoder.variables]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == FLOAT16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    try:
        data = converter.convert()
    except Exception as e:  # the converter's errors are of several types, each a wall of MLIR
        lines = [line for line in str(e).splitlines() if "error:" in line] or [cli.one_line(e)]
        raise LiteRTError(f"the LiteRT converter refused the model: {lines[0].strip()[:240]}") from None
    if quantize == INT8:
        data = litert_int8.int8_weights(data, calibration)
    ops = litert_runner.operator_names(data)
    if litert_runner.non_builtin_ops(data) or "VAR_HANDLE" in ops:
        raise LiteRTError(f"the converted model is not self-contained builtin ops (it uses {', '.join(sorted(ops))})")
    return data


def sidecar(parts: Parts, model: str, beam_size: int, max_length: int, quantize: str) -> dict:
    """The JSON beside the file: the vocabulary, and what an app or the runner must know."""
    return {"format": litert_runner.FORMAT, "format_version": litert_runner.FORMAT_VERSION,
            "tokens": parts.tokens, "beam_size": beam_size, "max_length": max_length,
            "length_alpha": DEFAULT_ALPHA, "encoder": parts.info.get("encoder"),
            "decoder": parts.info["config"].get("decoder"), "quantize": quantize,
            "inputs": list(litert_runner.INPUTS), "outputs": list(litert_runner.OUTPUTS),
            "export": fileio.absolute(model), "checkpoint": parts.info.get("checkpoint")}


def write(parts: Parts, model: str, output: str, beam_size: int, max_length: int,
          quantize: str = NONE, calibration: litert_int8.Calibration | None = None) -> tuple[int, str]:
    """Convert and write the file and its sidecar. -> (the file's size in bytes, the sidecar's path)."""
    _check_output(output)
    data = convert(parts, beam_size, max_length, quantize, calibration)
    beside = litert_runner.sidecar_path(output)
    with fileio.writing(output):
        fileio.write_bytes(output, data)
        fileio.write_json(beside, sidecar(parts, model, beam_size, max_length, quantize))
    return len(data), beside


def calibration_images(sources: list[str], count: int = litert_int8.CALIBRATION_IMAGES) -> litert_int8.Calibration:
    """Image files, or folders of them (*.jpg, *.jpeg, *.png), -> a Calibration of `count` of them
    spread evenly over the files in name order (all of them if there are fewer)."""
    paths = []
    for source in sources:
        if os.path.isdir(source):
            paths += sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(source):
            paths.append(source)
        else:
            raise LiteRTError(f"--calibration-images {source}: no such file or folder")
    if not paths:
        raise LiteRTError(f"--calibration-images {' '.join(sources)}: no {', '.join(IMAGE_SUFFIXES)} files there")
    chosen = [paths[i * len(paths) // count] for i in range(min(count, len(paths)))]
    pixels = []
    for path in chosen:
        try:
            with open(path, "rb") as f:
                pixels.append(images.decode(f.read()))
        except (OSError, images.ImageError) as e:
            raise LiteRTError(f"--calibration-images: {path}: {e}") from None
    return litert_int8.Calibration(pixels)


def _check_output(output: str) -> None:
    if not litert_runner.is_litert(output):
        raise LiteRTError(f"--output {output}: name it *{litert_runner.SUFFIX} (the caption command tells "
                          "a LiteRT model from an export by it)")


@cli.command
def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m caption_serving.litert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the export (JOB_DIR/export)")
    ap.add_argument("--output", required=True, help="the .tflite file to write (its .json goes beside it)")
    ap.add_argument("--beam-size", type=int, default=0,
                    help="the beam search's beams, fixed in the file (1: greedy; default: the export's)")
    ap.add_argument("--quantize", choices=QUANTIZE, default=NONE,
                    help="none: float32 weights; float16: half the size; int8: about a quarter, weights int8 with a "
                         "scale per channel outside the decoding loop and float16 in it (needs --calibration-images). "
                         "All computed in float32 (default none)")
    ap.add_argument("--calibration-images", nargs="+", metavar="IMG_OR_DIR",
                    help=f"for --quantize int8: images like those the model will caption, or folders of them "
                         f"(e.g. the training images); {litert_int8.CALIBRATION_IMAGES} are used")
    ap.add_argument("--max-length", type=int, default=0,
                    help="the longest caption, in tokens, <end> included (default: the export's)")
    ap.add_argument("--data", help="the data directory with the vocabulary (default: the export's, from export.json)")
    a = ap.parse_args(argv)
    if a.max_length < 0 or a.beam_size < 0:
        ap.error("--beam-size and --max-length must be >= 0")
    if (a.quantize == INT8) != bool(a.calibration_images):
        ap.error("--quantize int8 needs --calibration-images, and only it takes them")
    _check_output(a.output)  # before the seconds that loading and converting take
    calibration = calibration_images(a.calibration_images) if a.calibration_images else None
    parts = load_export(a.model, a.data)
    beam_size = a.beam_size or savedmodel.export_beam_size(parts.info)
    max_length = a.max_length or savedmodel.export_max_length(parts.info)
    size, beside = write(parts, a.model, a.output, beam_size, max_length, a.quantize, calibration)
    print(f"wrote {a.output} ({size / 1e6:.1f} MB, weights {a.quantize if a.quantize != NONE else 'float32'}, "
          f"beam size {beam_size}, captions up to {max_length} tokens, builtin ops only) and {beside} "
          f"({len(parts.tokens)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
