"""Image side: standardise the stored CNN features, then project them (Dense + ReLU)."""
import keras
import numpy as np
import tensorflow as tf

# A channel whose training std is below this (dead ReLUs: exactly 0; float16 features cannot
# resolve much less) is treated as constant: standardised to 0 whatever its value, rather than
# divided by ~0, which would blow up on any later deviation and in the kernel's gradient.
_MIN_STD = 1e-7


class FeatureEncoder(keras.layers.Layer):
    """[..., positions, feature_dim] float16/32 features -> [..., positions, embedding_dim].

    The per-channel mean and std come from the training split (the pipeline computes them) and
    are non-trainable weights of this layer, so checkpoints and the SavedModel carry them.
    Seeded-random encoder features have std ~8e-4: unstandardised, the model does not learn
    the image in minutes (docs/ARCHITECTURE.md).
    """

    def __init__(self, embedding_dim, feature_dim, feature_mean=None, feature_std=None, **kw):
        # autocast=False: Keras would cast float16 inputs straight to bfloat16 under a mixed
        # policy; standardise in float32 first, cast after (see standardize).
        super().__init__(autocast=False, **kw)
        self.embedding_dim = embedding_dim
        self.feature_dim = feature_dim
        # None means "to be restored from a checkpoint": identity until then.
        self._init_mean = _stat(feature_mean, 0.0, feature_dim, "feature_mean")
        self._init_std = _stat(feature_std, 1.0, feature_dim, "feature_std")
        self.dense = keras.layers.Dense(embedding_dim, activation="relu", name="dense",
                                        dtype=self.dtype_policy)

    def build(self, input_shape=None):
        # Statistics are kept in float32 whatever the compute dtype: standardising in bf16
        # would lose the small differences that carry the signal.
        self.mean = self.add_weight(shape=(self.feature_dim,), name="feature_mean",
                                    initializer=keras.initializers.Constant(self._init_mean),
                                    trainable=False, dtype="float32", autocast=False)
        self.std = self.add_weight(shape=(self.feature_dim,), name="feature_std",
                                   initializer=keras.initializers.Constant(self._init_std),
                                   trainable=False, dtype="float32", autocast=False)
        self.dense.build((None, self.feature_dim))
        self.built = True

    def inverse_std(self):
        return tf.where(self.std > _MIN_STD, 1.0 / tf.maximum(self.std, _MIN_STD), 0.0)

    def standardize(self, features):
        x = tf.cast(features, tf.float32)
        return tf.cast((x - self.mean) * self.inverse_std(), self.compute_dtype)

    def call(self, features):
        if self.compute_dtype != "float32":
            # bf16 cannot hold x - mean precisely when mean >> std: standardise in float32.
            return self.dense(self.standardize(features))
        # float32: fold the standardisation into the dense layer,
        #   ((x - m) / s) W + b = x (W / s) + (b - (m / s) W),
        # which skips three elementwise passes over the [B, 64, 2048] features (as many
        # bytes as the matmul reads) for a [2048, 256] rescale of the kernel.
        kernel = self.dense.kernel * self.inverse_std()[:, None]
        bias = self.dense.bias - tf.linalg.matvec(kernel, self.mean, transpose_a=True)
        # Reshape, then cast: the cast's one output then serves the matmul and its gradient
        # (cast-then-reshape left grappler two casts of the [B*64, 2048] features).
        x = tf.cast(tf.reshape(features, [-1, self.feature_dim]), tf.float32)
        y = tf.matmul(x, kernel) + bias
        shape = tf.concat([tf.shape(features)[:-1], [self.embedding_dim]], 0)
        return tf.nn.relu(tf.reshape(y, shape))


def _stat(value, default, dim, name):
    if value is None:
        return np.full((dim,), default, np.float32)
    value = np.asarray(value, np.float32)
    if value.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},), got {value.shape}")
    return value
