"""An export's images encoded in another precision than its image signatures', decided where it is loaded.

    captioner, choice = reencode.at_precision(loaded, info, path, "auto")
    client.caption_batch(captioner, blobs, beam_size, max_length)

An export's caption_images and serving_default encode in the precision chosen when the export was
made (export.json's encoder_precision; model/precision.py). A loader that decides for its own
machine (pipelines.caption_images: each worker, at load) and chooses another gets a captioner whose
caption_images encodes the images with the export's own encoder weights in that precision and
captions the features through the export's caption_features signature: the same decoding, the same
outputs. Where the choice is the export's, the loaded export is used as it is.
"""
from __future__ import annotations

import functools

from caption_io import cli, fileio, savedmodel
from model import backbones, precision


class ReencodeError(ValueError, cli.UserError):
    """An export whose encoder cannot be rebuilt here (one readable line)."""


def at_precision(loaded, info: dict, path: str, asked: str, probe=None):
    """-> (a captioner for client.caption_batch, the model.precision Choice made). loaded, info:
    client.load_model's; path: the export's directory; probe: model.precision.choose's."""
    # The export's encoder, loaded once: where auto times it, that is the one re-encoding.
    encoder = functools.cache(lambda: load_encoder(info, path))
    choice = precision.choose(asked, probe, work_speedup=(lambda: precision.time_encoder(encoder()[1]))
                              if "encoder" in info else None)
    if choice.precision == savedmodel.export_encoder_precision(info):
        return loaded, choice
    if "encoder" not in info:
        raise ReencodeError(f"{path}: its export.json does not name its encoder, so it cannot encode in "
                            f"{choice.precision}; export the job again, or pass {precision.FLAG} "
                            f"{savedmodel.export_encoder_precision(info)}")
    return Reencoded(loaded, encoder(), choice.precision), choice


def load_encoder(info: dict, path: str):
    """The export's image encoder as a Keras model (float32), its weights read from the SavedModel's
    variables -> (backbone, model)."""
    import tensorflow as tf

    backbone = backbones.of_encoder(info["encoder"])
    encoder = backbone.build("random")
    try:
        tf.train.Checkpoint(encoder=encoder).read(fileio.join(path, "variables", "variables")) \
            .expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ReencodeError(f"{path}: its encoder's weights are not the {backbone.name} export.json names "
                            f"({cli.one_line(e)[:160]})") from None
    return backbone, encoder


class Reencoded:
    """A loaded export whose caption_images signature encodes in `compute` with `rebuilt`, its
    encoder as `load_encoder` gives it; its other signatures are the export's own."""

    def __init__(self, loaded, rebuilt, compute: str):
        import tensorflow as tf

        backbone, encoder = rebuilt
        precision.set_compute(encoder, compute)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def encode(images):
            return precision.encode(encoder, backbone.prepare_files(images))

        self._loaded, self._encoder = loaded, encoder  # the signatures need their objects alive
        self.signatures = dict(loaded.signatures)
        self.signatures[savedmodel.CAPTION_IMAGES] = _ImagesThroughFeatures(
            encode, loaded.signatures[savedmodel.CAPTION_FEATURES])


class _ImagesThroughFeatures:
    """Called as caption_images is (images and the options, by name): encodes the images, then
    calls the features signature with them and the same options."""

    def __init__(self, encode, features_signature):
        import tensorflow as tf

        self._encode, self._features = encode, features_signature
        args, kwargs = features_signature.structured_input_signature
        kwargs = {k: v for k, v in kwargs.items() if k != savedmodel.FEATURES}
        kwargs[savedmodel.IMAGES] = tf.TensorSpec([None], tf.string, name=savedmodel.IMAGES)
        self.structured_input_signature = (args, kwargs)  # what client._call reads the inputs' names from

    def __call__(self, images, **options) -> dict:
        return self._features(**{savedmodel.FEATURES: self._encode(images)}, **options)
