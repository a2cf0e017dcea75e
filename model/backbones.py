"""The image encoders: keras.applications backbones without their tops, the last convolutional
grid of each taken as the image's features.

    backbone = backbones.get("mobilenet_v3_large")
    encoder = backbone.build("random", seed=0)          # [B, 224, 224, 3] -> [B, 49, 960]
    features = encoder(backbone.prepare(pixels))         # pixels: uint8 or 0..255 floats

The same network, with the same weights, makes the features in the pipeline and runs inside the
exported SavedModel (docs/ARCHITECTURE.md), so building each backbone, scaling its input and
saving/loading its weights all live here. What a backbone makes (input size, grid, channels) is
its `geometry`, which metadata.json records for everything downstream.
"""
from __future__ import annotations

import dataclasses
import os
import socket

import tensorflow as tf

from caption_io import cli
from caption_io.geometry import Geometry

WEIGHT_CHOICES = ("imagenet", "random", "PATH")
_IMAGENET_HOST = "storage.googleapis.com"
# How a backbone wants its pixels: InceptionV3 takes them scaled to [-1, 1]; the newer
# keras.applications networks take 0..255 and scale (or normalise) inside.
MINUS_ONE_TO_ONE, NETWORK_SCALES = "minus_one_to_one", "network_scales"


class EncoderWeightsError(ValueError, cli.UserError):
    """The requested encoder weights cannot be had."""


class BackboneError(ValueError, cli.UserError):
    """A backbone this code does not have (one readable line)."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str            # the --encoder choice, and metadata.json's encoder.name
    architecture: str    # the network and the layer the features come from
    geometry: Geometry   # what it takes and makes at its input size
    scaling: str         # MINUS_ONE_TO_ONE or NETWORK_SCALES
    imagenet_file: str   # Keras' ImageNet weights (no top), to tell whether they are cached
    application: str     # its keras.applications constructor (keras loads when a network is built)
    # Random weights: set the batch norms' statistics from seeded noise images. MobileNetV3's
    # Keras initialisation shrinks activations to ~1e-11 by its last block, below float16's
    # smallest number: its shards would hold zeros. The others' random features are stored as
    # they come (InceptionV3's ~4e-4, which data directories made so far hold).
    calibrate_random: bool = False

    @property
    def input_scaling(self) -> str:
        """metadata.json's words for `prepare`."""
        size = self.geometry.input_size
        if self.scaling == MINUS_ONE_TO_ONE:
            return f"bilinear resize to {size}x{size}, then x / 127.5 - 1"
        return f"bilinear resize to {size}x{size}; the network scales the 0..255 pixels itself"

    def prepare(self, images) -> tf.Tensor:
        """Pixels (uint8 or float in 0..255, [B, H, W, 3]) to the network's input."""
        size = self.geometry.input_size
        images = tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear")
        return images / 127.5 - 1.0 if self.scaling == MINUS_ONE_TO_ONE else images

    def prepare_files(self, images) -> tf.Tensor:
        """Image file bytes (string [B]) -> the network's input [B, size, size, 3], each image
        decoded (`decode`) and resized on its own, in TensorFlow ops (the SavedModel's images)."""
        size = self.geometry.input_size

        def one(data):
            return self.prepare(decode(data)[None])[0]

        return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

    def build(self, weights: str = "random", seed: int = 0):
        """The feature extractor: [B, size, size, 3] prepared pixels -> [B, positions, channels].

        weights: "imagenet" (Keras' download), "random" (seeded, for offline demos and tests:
        random conv features still carry colour, shape and place), or a path to a weights file
        saved by `save` for this backbone. -> a keras.Model.
        """
        import keras

        if weights == "imagenet" and not self._imagenet_reachable():
            raise EncoderWeightsError(
                f"--encoder-weights imagenet: the ImageNet weights of {self.name} are not cached and "
                f"{_IMAGENET_HOST} cannot be reached; use --encoder-weights random "
                "(seeded) or --encoder-weights PATH (a weights file you have)")
        from caption_io import fileio  # small files, local or gs://, in one place

        if weights not in ("imagenet", "random") and not fileio.exists(weights):
            raise EncoderWeightsError(
                f"--encoder-weights {weights}: no such file (choices: imagenet, random, or PATH to a weights file)")
        if weights == "random":
            # Initializers draw from the global Keras seed: the same seed gives the same network.
            # The weights are saved with the data all the same, so nothing downstream depends on
            # this being reproducible.
            keras.utils.set_random_seed(seed)
        g = self.geometry
        make = getattr(keras.applications, self.application)
        base = make(include_top=False, weights="imagenet" if weights == "imagenet" else None,
                    input_shape=(g.input_size, g.input_size, 3))
        if tuple(base.output.shape[1:]) != (g.rows, g.columns, g.channels):
            raise BackboneError(f"{self.name}: keras.applications made a {tuple(base.output.shape[1:])} map, "
                                f"not the {g.describe()} this code records")
        grid = keras.layers.Reshape(g.feature_shape, name="flatten_grid")(base.output)
        model = keras.Model(base.input, grid, name=f"{self.name}_features")
        if weights == "random" and self.calibrate_random:
            self._calibrate(model, seed)
        if weights not in ("imagenet", "random"):
            local = fileio.local_copy(weights)
            try:
                model.load_weights(local)
            except Exception as e:  # h5py/keras raise a zoo of types for a wrong file
                raise EncoderWeightsError(
                    f"--encoder-weights {weights}: not {self.name} (no top) weights: {e}") from e
            finally:
                if local != weights:
                    os.remove(local)
        return model

    def _calibrate(self, model, seed: int) -> None:
        """Each batch norm's moving mean and variance become those of its input on a batch of seeded
        uniform-noise images (one pass in training mode with momentum 0), so every layer's output
        is standardised as in a freshly initialised network in training: features of order 1."""
        import keras

        norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        momenta = [layer.momentum for layer in norms]
        for layer in norms:
            layer.momentum = 0.0
        size = self.geometry.input_size
        noise = tf.random.stateless_uniform([8, size, size, 3], seed=[seed, 0], maxval=255.0)
        model(self.prepare(noise), training=True)
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum

    def load(self, weights_path: str):
        """The encoder saved with a data directory (see `save`)."""
        return self.build(weights_path)

    def _imagenet_reachable(self) -> bool:
        keras_home = os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras"))
        if os.path.exists(os.path.join(keras_home, "models", self.imagenet_file)):
            return True
        try:
            socket.create_connection((_IMAGENET_HOST, 443), timeout=5).close()
            return True
        except OSError:
            return False


BACKBONES = {b.name: b for b in (
    # 2015; 78% ImageNet top-1, ~5.7 GFLOPs an image. The project's first encoder, and the default.
    Backbone("inception_v3", "InceptionV3/mixed10", Geometry(299, 8, 8, 2048), MINUS_ONE_TO_ONE,
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "InceptionV3"),
    # The current TensorFlow captioning tutorial's encoder: ~0.22 GFLOPs, 75% top-1.
    Backbone("mobilenet_v3_large", "MobileNetV3Large/last conv (960, hard-swish)", Geometry(224, 7, 7, 960),
             NETWORK_SCALES, "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "MobileNetV3Large",
             calibrate_random=True),
    # 84% top-1 at 384 px, ~8.8 GFLOPs.
    Backbone("efficientnet_v2_s", "EfficientNetV2S/top_activation", Geometry(384, 12, 12, 1280), NETWORK_SCALES,
             "efficientnetv2-s_notop.h5", "EfficientNetV2S"),
    # 82% top-1, ~4.5 GFLOPs; Keras ends it, without its top, in a LayerNorm over the last stage.
    Backbone("convnext_tiny", "ConvNeXtTiny/last stage + LayerNorm", Geometry(224, 7, 7, 768), NETWORK_SCALES,
             "convnext_tiny_notop.h5", "ConvNeXtTiny"),
)}
NAMES = tuple(BACKBONES)
DEFAULT = "inception_v3"


def get(name: str) -> Backbone:
    if name not in BACKBONES:
        raise BackboneError(f"encoder {name!r}: choose one of {', '.join(NAMES)}")
    return BACKBONES[name]


def of_encoder(record: dict | None) -> Backbone:
    """The backbone of an "encoder" record (metadata.json's, or an export's copy); records written
    before there was a choice (InceptionV3's) name none."""
    return get((record or {}).get("name", DEFAULT))


def decode(data) -> tf.Tensor:
    """Image file bytes (a scalar string) -> uint8 [H, W, 3], in TensorFlow ops.

    JPEGs use the accurate integer IDCT, which gives the same pixels as the
    pipeline's PIL decoder (TF's default fast IDCT differs by up to 6 levels,
    and a captioner on standardised features notices). Other formats (PNG, GIF,
    BMP) decode exactly either way.
    """
    def jpeg():
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return img

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def weights_sha256(model) -> str:
    """A digest of the weights' values (the .h5 file's own bytes differ from one
    save to the next), so a rerun can tell it has the same encoder."""
    import hashlib

    h = hashlib.sha256()
    for w in model.weights:
        h.update(str(w.shape).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def save(model, path: str) -> None:
    """Save the weights (a .weights.h5 file), locally or to gs://, whole or not at all."""
    from caption_io import fileio

    fileio.write_through_local(path, model.save_weights)
