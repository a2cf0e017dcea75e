"""Word side: a GRU that attends over the image and carries its state from word to word.

Per step t (h = h_{t-1}, w = the previous word):
    q, gh, b  = split(h @ K + c)                 one fused matmul: W2 h | GRU gates | f_beta(h)
    alpha, z  = attention(keys + q)              z = sum_i alpha_i f_i  (z *= sigmoid(b) if gate)
    gx        = E(w) @ Kw + bx + z @ Kz          GRU input gates from [z ; E(w)]
    h_t       = GRU(gx, gh, h)                   (Keras/cuDNN "reset_after" form)
    logits_t  = fc2(fc1(dropout(h_t)))

`teacher_forced` hoists out of the time loop everything that does not depend on h: the word
embeddings and their share of the GRU input matmul (E(w) @ Kw, one [T*B, E] x [E, 3U] matmul),
and fc1/fc2 (one [B*T, U] x [U, V] matmul after the loop). The loop keeps only the fused
h-matmul, attention and the GRU gates; W1 f is projected once per image by the caller.
"""
import collections

import keras
import tensorflow as tf

from model.attention import BahdanauAttention

# What one decode step needs: encoded features [B, P, E], their attention keys W1 f + b
# [B, P, U] (both fixed per image) and the GRU state [B, U]. A namedtuple, so tf.while_loop
# and beam search's tf.nest gathers handle it.
DecoderState = collections.namedtuple("DecoderState", ["features", "keys", "hidden"])


class AttentionGRUDecoder(keras.layers.Layer):

    def __init__(self, config, **kw):
        super().__init__(**kw)
        c = self.config = config
        policy = self.dtype_policy
        self.embedding = keras.layers.Embedding(c.vocab_size, c.embedding_dim,
                                                name="embedding", dtype=policy)
        self.attention = BahdanauAttention(c.units, name="attention", dtype=policy)
        # h_0 = tanh(W mean_i(f_i) + b), the paper's initialisation: the first word then
        # already depends on the whole image, not only on what step 1 attends to.
        self.init_hidden = keras.layers.Dense(c.units, activation="tanh", name="init_hidden",
                                              dtype=policy)
        self.embedding_dropout = keras.layers.Dropout(c.dropout, name="embedding_dropout",
                                                    dtype=policy)
        self.output_dropout = keras.layers.Dropout(c.dropout, name="output_dropout",
                                                 dtype=policy)
        self.fc1 = keras.layers.Dense(c.units, name="fc1", dtype=policy)
        # The vocabulary projection computes in float32 even under mixed precision, so
        # logits (and the softmax over 5,000 words) keep full precision.
        self.fc2 = keras.layers.Dense(c.vocab_size, name="fc2", dtype="float32")

    def build(self, input_shape=None):
        c = self.config
        e, u = c.embedding_dim, c.units
        self.embedding.build((None,))
        self.attention.build((None, c.num_positions, e))
        self.init_hidden.build((None, e))
        self.fc1.build((None, u))
        self.fc2.build((None, u))
        # GRU input kernel, split by input: word embedding rows (hoisted out of the loop)
        # and attention context rows (inside it). Gate order z, r, n.
        self.word_kernel = self.add_weight(shape=(e, 3 * u), name="word_kernel",
                                           initializer="glorot_uniform")
        self.context_kernel = self.add_weight(shape=(e, 3 * u), name="context_kernel",
                                              initializer="glorot_uniform")
        self.input_bias = self.add_weight(shape=(3 * u,), name="input_bias",
                                          initializer="zeros")
        # Everything that multiplies h_{t-1}, fused into one variable so each step does one
        # matmul with no concat: [W2 (attention query) | GRU recurrent z, r, n | f_beta].
        width = 4 * u + (1 if c.gate else 0)
        self.recurrent_kernel = self.add_weight(shape=(u, width), name="recurrent_kernel",
                                                initializer=_fused_recurrent_init(u, c.gate))
        self.recurrent_bias = self.add_weight(shape=(width,), name="recurrent_bias",
                                              initializer="zeros")
        self.built = True

    # ------------------------------------------------------------------ pieces
    def initial_hidden(self, features):
        return self.init_hidden(tf.reduce_mean(features, axis=1))

    def logits(self, outputs, training=False):
        """GRU outputs [..., U] -> float32 logits [..., V]."""
        x = self.fc1(self.output_dropout(outputs, training=training))
        return self.fc2(tf.cast(x, tf.float32))

    def word_gates(self, tokens, training=False):
        """Token ids [...] -> the embedding's share of the GRU input gates [..., 3U]."""
        x = self.embedding_dropout(self.embedding(tokens), training=training)
        kernel = tf.cast(self.word_kernel, x.dtype)
        gates = tf.matmul(tf.reshape(x, [-1, self.config.embedding_dim]), kernel)
        gates = tf.reshape(gates, tf.concat([tf.shape(tokens), [3 * self.config.units]], 0))
        return gates + tf.cast(self.input_bias, x.dtype)

    def _loop_weights(self):
        # Cast once per call (outside any loop), not once per step.
        dt = self.compute_dtype
        return (tf.cast(self.recurrent_kernel, dt), tf.cast(self.recurrent_bias, dt),
                tf.cast(self.context_kernel, dt))

    def _cell(self, weights, state, word_gates):
        """One step from h_{t-1}: returns h_t [B, U] and attention [B, P] (float32)."""
        rec_kernel, rec_bias, ctx_kernel = weights
        u = self.config.units
        hidden = state.hidden
        sizes = [u, u, u, u] + ([1] if self.config.gate else [])
        parts = tf.split(tf.matmul(hidden, rec_kernel) + rec_bias, sizes, axis=-1)
        query, hz, hr, hn = parts[:4]
        context, alpha = self.attention(state.features, state.keys, query)
        if self.config.gate:
            context = context * tf.sigmoid(parts[4])
        xz, xr, xn = tf.split(word_gates + tf.matmul(context, ctx_kernel), 3, axis=-1)
        z = tf.sigmoid(xz + hz)
        r = tf.sigmoid(xr + hr)
        n = tf.tanh(xn + r * hn)
        return n + z * (hidden - n), alpha      # = z * h + (1 - z) * n

    # ------------------------------------------------------------------ public
    def step(self, state, prev_tokens, training=False):
        """prev_tokens [B] -> (logits [B, V] float32, h_t [B, U], attention [B, P])."""
        gates = self.word_gates(prev_tokens, training)
        hidden, alpha = self._cell(self._loop_weights(), state, gates)
        return self.logits(hidden, training), hidden, alpha

    def teacher_forced(self, state, inputs, training=False):
        """inputs [B, T] token ids -> (logits [B, T, V] float32, attention [B, T, P]).

        One tf.while_loop over a dynamic T: traced once whatever the caption length.
        """
        c = self.config
        weights = self._loop_weights()
        words = tf.transpose(inputs)                         # time-major [T, B]
        gates = self.word_gates(words, training)             # [T, B, 3U], all steps at once
        steps = tf.shape(words)[0]
        dtype = gates.dtype
        gates_ta = tf.TensorArray(dtype, size=steps, element_shape=[None, 3 * c.units])
        gates_ta = gates_ta.unstack(gates)
        out_ta = tf.TensorArray(dtype, size=steps, element_shape=[None, c.units])
        att_ta = tf.TensorArray(tf.float32, size=steps, element_shape=[None, c.num_positions])

        def body(t, hidden, out_ta, att_ta):
            hidden, alpha = self._cell(weights, state._replace(hidden=hidden), gates_ta.read(t))
            return t + 1, hidden, out_ta.write(t, hidden), att_ta.write(t, alpha)

        _, _, out_ta, att_ta = tf.while_loop(
            lambda t, *_: t < steps, body, (tf.constant(0), state.hidden, out_ta, att_ta),
            maximum_iterations=steps)   # a bound XLA needs to compile the gradient
        outputs = tf.transpose(out_ta.stack(), [1, 0, 2])    # [B, T, U]: cheap, before fc2
        attention = tf.transpose(att_ta.stack(), [1, 0, 2])  # [B, T, P]
        return self.logits(outputs, training), attention


def _fused_recurrent_init(units, gate):
    glorot, orthogonal = keras.initializers.GlorotUniform(), keras.initializers.Orthogonal()

    def init(shape, dtype=None):
        parts = [glorot((units, units), dtype=dtype),               # W2 (attention query)
                 orthogonal((units, 3 * units), dtype=dtype)]       # GRU recurrent, as Keras
        if gate:
            parts.append(glorot((units, 1), dtype=dtype))           # f_beta
        return keras.ops.concatenate(parts, axis=1)
    return init
