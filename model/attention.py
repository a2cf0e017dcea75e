"""Bahdanau (additive) attention over the image grid: score_i = v . tanh(W1 f_i + W2 h)."""
import keras
import tensorflow as tf


class BahdanauAttention(keras.layers.Layer):
    """Split into the part that depends only on the image and the part that depends on h.

    `project_features` computes W1 f + b once per image (the tutorial redid it at every word,
    most of its arithmetic). The per-step `call` receives the query already projected,
    q = W2 h: the decoder owns W2 as columns of its fused recurrent kernel, so one matmul of
    h_{t-1} per step serves the attention query, the GRU's recurrent gates and the beta gate.
    """

    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.units = units
        self.w1 = keras.layers.Dense(units, name="w1", dtype=self.dtype_policy)

    def build(self, features_shape):
        self.w1.build(features_shape)
        self.v = self.add_weight(shape=(self.units, 1), name="v",
                                 initializer="glorot_uniform")
        self.built = True

    def project_features(self, features):
        """[B, P, E] encoded features -> keys W1 f + b, [B, P, units]. Once per image."""
        return self.w1(features)

    def call(self, features, keys, query):
        """features [B, P, E], keys [B, P, U] (project_features), query W2 h [B, U].

        Returns context [B, E] (compute dtype) and attention weights [B, P] (float32).
        """
        dtype = keys.dtype
        hidden = tf.tanh(keys + query[:, None, :])                        # [B, P, U]
        # [B*P, U] @ [U, 1]: one matrix-vector product, no [B, P, U] temporary for v*tanh.
        scores = tf.matmul(tf.reshape(hidden, [-1, self.units]), tf.cast(self.v, dtype))
        scores = tf.reshape(scores, tf.shape(keys)[:2])                   # [B, P]
        # Softmax in float32: bf16 would round the weights of 64 positions too coarsely.
        weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
        context = tf.matmul(tf.cast(weights, features.dtype)[:, None, :], features)[:, 0, :]
        return context, weights
