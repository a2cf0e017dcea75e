"""Export a trained job as a SavedModel that captions raw image bytes.

    python -m caption_serving.export --job-dir JOB_DIR [--output DIR] [--data DATA_DIR] [--checkpoint last|best|PATH]
           [--encoder-precision auto|float32|bfloat16]

The SavedModel holds everything: the image encoder (the data's backbone, model/backbones.py) with
exactly the weights that made the training features (computing in float32, or in bfloat16 where
--encoder-precision says so or auto measures it faster here: model/precision.py), the image
decoding and scaling, the caption decoder and the vocabulary. It needs TensorFlow and nothing else (no
tensorflow-text op: captions are spelled with gathers over the vocabulary, caption_io.tokenizer.Spelling).

Its signatures, inputs and outputs are the contract in caption_io/savedmodel.py
(SavedModel signatures cannot give inputs default values, so the one with options is a
second signature; the input names are the traced functions' argument names). Beside it,
in assets.extra/, export.json, TF Serving's warm-up requests (caption_serving/warmup.py) and
batching parameters (caption_serving/batching_config.py).
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before TensorFlow is imported, below
    from caption_io import quiet

    quiet.install()

import logging
import os
import shutil
import sys

import tensorflow as tf

from caption_io import checkpoints, cli, decoding_defaults, fileio, jobdir, metadata, savedmodel, tokenizer
from caption_io.jobdir import CONFIG_FILE
from caption_io.savedmodel import EXPORT_INFO
from caption_serving import batching_config, warmup
from model import Captioner, CaptionerConfig, backbones, decoding, precision

CHECKPOINT_CHOICES = ("last", "best")  # or a checkpoint's path
log = logging.getLogger(__name__)


# A SavedModel that serves: without the gradients of the encoders' custom-gradient activations
# (EfficientNetV2 has some 300), which saving would otherwise trace and write one by one.
SAVE_OPTIONS = tf.saved_model.SaveOptions(experimental_custom_gradients=False)


class ExportError(ValueError, cli.UserError):
    """A job that cannot be exported (one readable line)."""


# The option signatures' inputs after the images or features (savedmodel.OPTIONS, in order;
# the input names are the traced functions' argument names).
OPTION_SPECS = [tf.TensorSpec([], tf.int32) for _ in savedmodel.INT_OPTIONS] + [tf.TensorSpec([], tf.float32)]


class CaptionModule(tf.Module):
    def __init__(self, captioner: Captioner, backbone: backbones.Backbone, encoder, tokens: list[str],
                 beam_size: int, max_length: int):
        super().__init__()
        self.captioner = captioner
        self._backbone = backbone  # how images are sized and scaled for `encoder`
        self.encoder = encoder
        self._spelling = tokenizer.Spelling(tokens)
        self.default_beam_size = beam_size
        self.default_max_length = max_length
        # The feature signature's shape comes from the model, so it is made here. The signatures are
        # TensorFlow ops and explicit loops: without autograph's conversion an export takes half the time.
        self.caption_features = tf.function(self._caption_features, autograph=False, input_signature=[
            tf.TensorSpec([None, captioner.config.num_positions, captioner.config.feature_dim], tf.float32),
            *OPTION_SPECS])

    def weights_only(self) -> tf.Module:
        """What the SavedModel saves beside its signatures: the captioner's and the encoder's
        weights (the vocabulary is in the signatures' graphs, as the constants they gather from).
        Saving this module itself would serialise its tf.functions too, tracing each again (a third
        of an export's time) for callers that use the signatures alone."""
        root = tf.Module()
        root.captioner, root.encoder = self.captioner, self.encoder
        return root

    def _text(self, tokens) -> dict:
        """Token ids [..., T] -> the captions as written [...] and each token's text [..., T]."""
        return {"captions": self._spelling.text(tokens), "token_text": self._spelling.token_text(tokens)}

    def _decode(self, features, beam_size, max_length, nbest=False, **controls):
        out = decoding.decode(self.captioner, features, max_length, beam_size=beam_size, **controls)
        outputs = savedmodel.BEST.named(out.best, **self._text(out.best.tokens))
        if nbest:
            # An empty place (fewer distinct hypotheses than asked) has length 0; its score is
            # 0 rather than decoding's -inf, which JSON (TF Serving's REST answers) cannot carry.
            outputs.update(savedmodel.NBEST.named(out.nbest, **self._text(out.nbest.tokens),
                                                  scores=tf.where(out.nbest.lengths > 0, out.nbest.scores, 0.0)))
        return outputs

    def _features(self, images):
        """Image file bytes [B] -> the encoder's features [B, positions, channels], float32 whatever
        the precision the encoder computes in (model/precision.py)."""
        return precision.encode(self.encoder, self._backbone.prepare_files(images))

    @staticmethod
    def _controls(num_captions, no_repeat_ngram, min_length, length_alpha) -> dict:
        return {"num_captions": num_captions, "no_repeat_ngram": no_repeat_ngram, "min_length": min_length,
                "length_penalty_alpha": length_alpha}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), *OPTION_SPECS], autograph=False)
    def caption_images(self, images, beam_size, max_length, num_captions, no_repeat_ngram, min_length,
                       length_alpha):
        return self._decode(self._features(images), beam_size, max_length, nbest=True,
                            **self._controls(num_captions, no_repeat_ngram, min_length, length_alpha))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def serving_default(self, images):
        # Decoding's defaults as constants: the graph TF Serving runs has no control it does not use.
        return self._decode(self._features(images), tf.constant(self.default_beam_size),
                            tf.constant(self.default_max_length))

    def _caption_features(self, features, beam_size, max_length, num_captions, no_repeat_ngram, min_length,
                          length_alpha):
        return self._decode(features, beam_size, max_length, nbest=True,
                            **self._controls(num_captions, no_repeat_ngram, min_length, length_alpha))


def _restore(captioner: Captioner, job_dir: str, which: str) -> str:
    """Restore `which` (last: the newest intact checkpoint; best: the best epoch's on the job's
    --early-stopping-metric, the validation loss or CIDEr;
    or a checkpoint's path) into `captioner`. -> the checkpoint's path."""
    def restore(path):
        tf.train.Checkpoint(model=captioner).restore(path).expect_partial().assert_existing_objects_matched()

    if which not in CHECKPOINT_CHOICES:
        try:
            restore(which)
        except Exception as e:
            raise ExportError(f"--checkpoint {which}: cannot restore it ({str(e).strip().splitlines()[0][:160]})") \
                from None
        return which
    folder = fileio.join(job_dir, jobdir.BEST if which == "best" else jobdir.CHECKPOINTS)
    path, damaged = checkpoints.restore_newest_intact(folder, restore)
    if path is None:
        kind = "intact checkpoint" if damaged else "checkpoint"
        why = f" ({'; '.join(damaged)})" if damaged else \
            " (the best one is kept when the job validates)" if which == "best" else ""
        raise ExportError(f"--job-dir {job_dir}: no {kind} in {folder}{why}")
    if damaged:
        print(f"checkpoint damaged: {'; '.join(damaged)}; exporting {os.path.basename(path)}, the newest intact one",
              file=sys.stderr)
    return path


def build_module(job_dir: str, data_dir: str | None = None, beam_size: int = decoding_defaults.BEAM_SIZE,
                 max_length: int | None = None, checkpoint: str = "last",
                 encoder_precision: str | None = None) -> tuple[CaptionModule, dict]:
    """encoder_precision: the image signatures' encoder's (model/precision.py; None: the flag's
    default); auto is measured here, when the export is made, and export.json records the choice."""
    asked = precision.check(encoder_precision or precision.default())
    cfg_path = fileio.join(job_dir, CONFIG_FILE)
    if not fileio.exists(cfg_path):
        raise ExportError(f"--job-dir {job_dir}: no {CONFIG_FILE} (is this a training job directory?)")
    config = CaptionerConfig.from_json(fileio.read_text(cfg_path))
    try:
        data_dir = jobdir.data_dir(job_dir, data_dir)
    except jobdir.RecordedPathError as e:
        raise ExportError(str(e)) from None
    meta = metadata.read(data_dir)
    metadata.check_encoder(jobdir.recorded_encoder(job_dir), meta, f"--job-dir {job_dir}", f"--data {data_dir}")
    if (config.num_positions, config.feature_dim) != meta.geometry.feature_shape:
        raise ExportError(f"--data {data_dir}: {meta.geometry.describe()} ({meta.encoder.name}), and the model "
                          f"attends over {config.num_positions} positions of {config.feature_dim} channels")
    tokens = metadata.load_vocab(data_dir, meta)
    if len(tokens) != config.vocab_size:
        raise ExportError(f"--data {data_dir}: vocabulary of {len(tokens)} tokens, the model has {config.vocab_size}")
    # Serving computes in float32 whatever the training precision.
    config = CaptionerConfig.from_dict(dict(config.to_dict(), compute_dtype="float32", dropout=0.0))
    captioner = Captioner(config)
    ckpt = _restore(captioner, job_dir, checkpoint)
    enc_path = fileio.join(data_dir, meta.encoder.file)
    if fileio.sha256(enc_path) != meta.encoder.sha256:
        raise ExportError(f"{enc_path}: not the encoder that made the features (sha256 differs from metadata.json)")
    backbone = backbones.get(meta.encoder.name)
    encoder = backbone.load(enc_path)
    chosen = precision.choose(asked, work_speedup=lambda: precision.time_encoder(encoder))
    if chosen.precision != precision.FLOAT32:
        precision.set_compute(encoder, chosen.precision)
    log.info("the image signatures' encoder computes in %s", chosen.describe())
    longest = meta.max_tokens
    max_length = max_length or savedmodel.default_max_length(longest)  # generated tokens (<end> included)
    info = {"checkpoint": fileio.absolute(ckpt), "encoder": meta.encoder.to_dict(), "config": config.to_dict(),
            "vocab_size": len(tokens), savedmodel.INFO_BEAM_SIZE: beam_size, savedmodel.INFO_MAX_LENGTH: max_length,
            "signatures": list(savedmodel.SIGNATURES), "data": data_dir,
            savedmodel.INFO_ENCODER_PRECISION: chosen.to_dict()}
    return CaptionModule(captioner, backbone, encoder, tokens, beam_size, max_length), info


def export(job_dir: str, output: str | None = None, data_dir: str | None = None,
           beam_size: int = decoding_defaults.BEAM_SIZE,
           max_length: int | None = None, checkpoint: str = "last", encoder_precision: str | None = None) -> str:
    """Write the SavedModel to `output` (default JOB_DIR/export). Locally it is written beside
    and renamed into place whole; on gs:// export.json, written last, marks it complete. A
    refused write (a full disk) leaves the previous export as it was and raises WriteError."""
    module, info = build_module(job_dir, data_dir, beam_size, max_length, checkpoint, encoder_precision)
    output = (output or fileio.join(job_dir, jobdir.EXPORT)).rstrip("/")
    info = jobdir.record_data(info, info["data"], output)
    signatures = {
        savedmodel.SERVING_DEFAULT: module.serving_default.get_concrete_function(),
        savedmodel.CAPTION_IMAGES: module.caption_images.get_concrete_function(),
        savedmodel.CAPTION_FEATURES: module.caption_features.get_concrete_function(),
    }
    root = module.weights_only()
    if fileio.is_gcs(output):
        with fileio.writing(output):
            if fileio.exists(fileio.join(output, EXPORT_INFO)):
                fileio.remove(fileio.join(output, EXPORT_INFO))
            tf.saved_model.save(root, output, signatures=signatures, options=SAVE_OPTIONS)
            warmup.write(output)
            batching_config.write(output)
            fileio.write_json(fileio.join(output, EXPORT_INFO), info)
        return output
    staging = f"{output}{fileio.TMP_MARK}{os.getpid()}"
    try:
        with fileio.writing(output):
            tf.saved_model.save(root, staging, signatures=signatures, options=SAVE_OPTIONS)
            warmup.write(staging)
            batching_config.write(staging)
            fileio.write_json(fileio.join(staging, EXPORT_INFO), info)
            _replace_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _replace_dir(new: str, dest: str) -> None:
    """Put the folder `new` at `dest`, replacing what is there (a rename each, no copy)."""
    old = f"{dest}{fileio.TMP_MARK}old-{os.getpid()}"
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


@cli.command
def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m caption_serving.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--job-dir", required=True)
    ap.add_argument("--output", help="default: JOB_DIR/export")
    ap.add_argument("--data", help="the data directory (default: the one the job trained on, from job.json)")
    ap.add_argument("--checkpoint", default="last", metavar="last|best|PATH",
                    help="last: the newest intact checkpoint; best: the best epoch's (on the job's "
                         "--early-stopping-metric); or a checkpoint path")
    ap.add_argument("--beam-size", type=int, default=decoding_defaults.BEAM_SIZE, help="serving_default's beam size")
    ap.add_argument("--max-length", type=int, default=0, help="serving_default's longest caption (0: from the data)")
    precision.add_flag(ap, "measured when the export is made, on this machine")
    a = ap.parse_args(argv)
    if a.beam_size < 1 or a.max_length < 0:
        ap.error("--beam-size must be >= 1 and --max-length >= 0")
    out = export(a.job_dir, a.output, a.data, a.beam_size, a.max_length or None, a.checkpoint, a.encoder_precision)
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
