"""Bahdanau (additive) attention over the image grid: score_i = v . tanh(W1 f_i + W2 h)."""
import keras
import tensorflow as tf


class BahdanauAttention(keras.layers.Layer):
    """Split into the part that depends only on the image and the part that depends on h.

    `project_features` computes the keys W1 f + b once per image (the tutorial redid it at
    every word, most of its arithmetic). The per-step `call` receives the query already
    projected, q = W2 h: the decoder owns W2 as columns of its fused recurrent kernel, so one
    matmul of h_{t-1} per step serves the attention query, the GRU gates and the beta gate.
    """

    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.units = units
        self.w1 = keras.layers.Dense(units, name="w1", dtype=self.dtype_policy)

    def build(self, features_shape):
        self.w1.build(features_shape)
        self.v = self.add_weight(shape=(self.units,), name="v", initializer="glorot_uniform")
        self.built = True

    def project_features(self, features):
        """[B, P, E] encoded features -> keys W1 f + b, [B, P, units]. Once per image."""
        return self.w1(features)

    def call(self, features, keys, query):
        """-> context [B, E] (compute dtype), weights [B, P] (float32)."""
        context, weights, _ = attend(features, keys, query, tf.cast(self.v, keys.dtype))
        return context, weights


def attend(features, keys, query, v):
    """The per-step arithmetic, as a function of tensors (the recurrence's hand-written
    gradient needs it so). Also returns tanh(keys + query) [B, P, U] for that gradient.
    model/fused_attention.py has the same as one CPU kernel, for training."""
    hidden = tf.tanh(keys + query[:, None, :])                                 # [B, P, U]
    # [B*P, U] @ [U, 1]: one matrix-vector product, no [B, P, U] temporary for v * tanh.
    scores = tf.matmul(tf.reshape(hidden, [-1, tf.shape(v)[0]]), v[:, None])
    scores = tf.reshape(scores, tf.shape(keys)[:2])                            # [B, P]
    # Softmax in float32: in bf16 the weights of 64 positions would be rounded too coarsely.
    weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
    context = tf.matmul(tf.cast(weights, features.dtype)[:, None, :], features)[:, 0, :]
    return context, weights, hidden
