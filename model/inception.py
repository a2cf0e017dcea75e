"""The image encoder: InceptionV3 without its top, 299x299 in, an 8x8x2048 map out.

The same network, with the same weights, makes the features in the pipeline and
runs inside the exported SavedModel (docs/ARCHITECTURE.md), so building it, scaling
its input and saving/loading its weights all live here.
"""
from __future__ import annotations

import os
import socket

import keras
import tensorflow as tf

from caption_io import cli
from caption_io.geometry import CHANNELS, GRID, INPUT_SIZE

ARCHITECTURE = "InceptionV3/mixed10"
WEIGHT_CHOICES = ("imagenet", "random", "PATH")
_IMAGENET_HOST = "storage.googleapis.com"
_IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"


class EncoderWeightsError(ValueError, cli.UserError):
    """The requested encoder weights cannot be had."""


def prepare(images) -> tf.Tensor:
    """Pixels (uint8 or float in 0..255, [B, H, W, 3]) to the network's input:
    bilinear resize to 299x299, then InceptionV3's scaling to [-1, 1]."""
    images = tf.image.resize(tf.cast(images, tf.float32), (INPUT_SIZE, INPUT_SIZE), method="bilinear")
    return images / 127.5 - 1.0


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


def _imagenet_reachable() -> bool:
    cached = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models", _IMAGENET_FILE)
    if os.path.exists(cached):
        return True
    try:
        socket.create_connection((_IMAGENET_HOST, 443), timeout=5).close()
        return True
    except OSError:
        return False


def build(weights: str = "random", seed: int = 0) -> keras.Model:
    """InceptionV3 feature extractor: [B, 299, 299, 3] scaled pixels -> [B, 64, 2048].

    weights: "imagenet" (Keras' download), "random" (seeded, for offline demos
    and tests: random conv features still carry colour, shape and place), or a
    path to a weights file for this architecture.
    """
    if weights == "imagenet":
        if not _imagenet_reachable():
            raise EncoderWeightsError(
                "--encoder-weights imagenet: the ImageNet weights are not cached and "
                f"{_IMAGENET_HOST} cannot be reached; use --encoder-weights random "
                "(seeded) or --encoder-weights PATH (a weights file you have)")
        base_weights = "imagenet"
    else:
        from caption_io import fileio  # small files, local or gs://, in one place

        base_weights = None
        if weights != "random" and not fileio.exists(weights):
            raise EncoderWeightsError(
                f"--encoder-weights {weights}: no such file (choices: imagenet, random, or PATH to a weights file)")
    if weights == "random":
        # Initializers draw from the global Keras seed: the same seed gives the
        # same network. The weights are saved with the data all the same, so
        # nothing downstream depends on this being reproducible.
        keras.utils.set_random_seed(seed)
    base = keras.applications.InceptionV3(
        include_top=False, weights=base_weights, input_shape=(INPUT_SIZE, INPUT_SIZE, 3))
    grid = keras.layers.Reshape((GRID * GRID, CHANNELS), name="flatten_grid")(base.output)
    model = keras.Model(base.input, grid, name="inception_v3_features")
    if weights not in ("imagenet", "random"):
        local = fileio.local_copy(weights)
        try:
            model.load_weights(local)
        except Exception as e:  # h5py/keras raise a zoo of types for a wrong file
            raise EncoderWeightsError(
                f"--encoder-weights {weights}: not InceptionV3 (no top) weights: {e}") from e
        finally:
            if local != weights:
                os.remove(local)
    return model


def weights_sha256(model: keras.Model) -> str:
    """A digest of the weights' values (the .h5 file's own bytes differ from one
    save to the next), so a rerun can tell it has the same encoder."""
    import hashlib

    h = hashlib.sha256()
    for w in model.weights:
        h.update(str(w.shape).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def load(weights_path: str) -> keras.Model:
    """The encoder saved with a data directory (see `save`)."""
    return build(weights_path)


def save(model: keras.Model, path: str) -> None:
    """Save the weights (a .weights.h5 file), locally or to gs://, whole or not at all."""
    from caption_io import fileio

    fileio.write_through_local(path, model.save_weights)
