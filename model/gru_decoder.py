"""Word side, the paper's family: a GRU that attends over the image and carries its state from
word to word (`--decoder gru`, the default; model/decoders.py has the interface it offers).

Per step t (h = h_{t-1}, w = the previous word; the arithmetic is in recurrence.py):
    q | gh | b  = h @ K + c                      one fused matmul: W2 h | GRU gates | f_beta(h)
    alpha, z    = attention(keys + q)            z = sum_i alpha_i f_i  (z *= sigmoid(b) if gate)
    h_t         = GRU([z ; E(w)], gh, h)         input gates: E(w) @ Kw + bx + z @ Kz
    logits_t    = fc2(fc1(dropout(h_t)))

Hoisted out of the time loop: the keys W1 f + b (once per image, initial_state), the
word embeddings and their share of the GRU input gates (one [T*B, E] x [E, 3U] matmul), and
fc1/fc2 (one [T*B, U] x [U, V] matmul after the loop). The loop keeps only the fused
h-matmul, attention and the GRU gates. Dropout: on word embeddings and on h_t before fc1
(both outside the loop, so the recurrence stays deterministic).
"""
import collections

import keras
import tensorflow as tf

from model import recurrence
from model.attention import BahdanauAttention
from model.decoders import Packed, any_batch, caption_ends

# What one decode step needs: encoded features [B, P, E], their attention keys W1 f + b
# [B, P, U] (both fixed per image) and the GRU state [B, U].
GRUState = collections.namedtuple("GRUState", ["features", "keys", "hidden"])


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
        # The vocabulary projection computes in the compute dtype, as every other matmul (in a
        # bfloat16 step it is over a third of the FLOPs); its logits are cast to float32 before the
        # softmax and the loss (`logits`). Its variables are float32 in either.
        self.fc2 = keras.layers.Dense(c.vocab_size, name="fc2", dtype=policy)

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
        return tf.cast(self.fc2(x), tf.float32)

    def word_gates(self, tokens, training=False):
        """Token ids [...] -> the embedding's share of the GRU input gates [..., 3U]."""
        x = self.embedding_dropout(self.embedding(tokens), training=training)
        kernel = tf.cast(self.word_kernel, x.dtype)
        gates = tf.matmul(tf.reshape(x, [-1, self.config.embedding_dim]), kernel)
        gates = tf.reshape(gates, tf.concat([tf.shape(tokens), [3 * self.config.units]], 0))
        return gates + tf.cast(self.input_bias, x.dtype)

    def loop_weights(self):
        """The recurrence's weights in the compute dtype: cast once per call, not per step."""
        dt = self.compute_dtype
        return recurrence.LoopWeights(
            tf.cast(self.recurrent_kernel, dt), tf.cast(self.recurrent_bias, dt),
            tf.cast(self.context_kernel, dt), tf.cast(self.attention.v, dt))

    # ------------------------------------------------------------------ public
    def initial_state(self, encoded):
        """Encoded features [B, P, E] -> the state before the first word: the features, their
        attention keys and h_0."""
        return GRUState(features=encoded, keys=self.attention.project_features(encoded),
                        hidden=self.initial_hidden(encoded))

    def step(self, state, prev_tokens, training=False):
        """prev_tokens [B] -> (logits [B, V] float32, state with h_t, attention [B, P])."""
        gates = self.word_gates(prev_tokens, training)
        hidden, alpha, _ = recurrence.cell(state.features, state.keys, state.hidden, gates,
                                           self.loop_weights(), self.config.gate)
        return self.logits(hidden, training), state._replace(hidden=hidden), alpha

    def reorder(self, state, rows):
        """Beam search: h of row rows[i] into row i (features and keys are per image, the
        same in every beam of it, so they stay: [B*k, 64, 512] keys are not copied a word)."""
        return state._replace(hidden=tf.gather(state.hidden, rows))

    def state_invariants(self, state):
        """Only the batch changes in a loop (the cell reads the static feature dims)."""
        return any_batch(state)

    def teacher_forced_outputs(self, state, inputs, training=False, fused=False):
        """inputs [B, T] token ids -> (GRU outputs [B, T, U], attention [B, T, P] float32).

        Every position, padding included (what T calls of `step` would give). fused: the
        CPU attention kernels (model/fused_attention.py) in the time loop.
        """
        steps, batch = tf.shape(inputs)[1], tf.shape(inputs)[0]
        words = tf.reshape(tf.transpose(inputs), [-1])             # time-major, packed
        hidden, attention = recurrence.recurrence(
            state.features, state.keys, state.hidden, self.word_gates(words, training),
            self.loop_weights(), self.config.gate, fused=fused)
        unpack = lambda x: tf.transpose(tf.reshape(x, [steps, batch, -1]), [1, 0, 2])
        return unpack(hidden), unpack(attention)

    def teacher_forced(self, state, inputs, training=False):
        """inputs [B, T] -> (logits [B, T, V] float32, attention [B, T, P] float32)."""
        outputs, attention = self.teacher_forced_outputs(state, inputs, training)
        return self.logits(outputs, training), attention   # fc1/fc2 once, after the loop

    def packed_teacher_forced(self, state, inputs, targets, training=False, fused=False):
        """Teacher forcing on real positions only (the training path).

        A caption runs up to its last non-pad target; captions are sorted longest first so
        that step t runs the first active[t] of them. Returns Packed(outputs [N, U],
        attention [N, P], targets [N], caption [N] = each row's index in the batch), rows in
        time-major order, N = the number of positions up to each caption's end.
        """
        lengths, longest = caption_ends(targets)                # trailing pad columns: skipped
        order = tf.argsort(lengths, direction="DESCENDING", stable=True)
        sorted_lengths = tf.gather(lengths, order)
        running = tf.range(longest)[:, None] < sorted_lengths[None, :]       # [T', B] sorted
        active = tf.reduce_sum(tf.cast(running, tf.int32), axis=1)          # [T']
        where = tf.where(running)                          # (t, i): time-major, i < active[t]
        caption = tf.gather(order, where[:, 1])
        index = tf.stack([caption, tf.cast(where[:, 0], caption.dtype)], 1)
        sorted_state = tf.nest.map_structure(lambda x: tf.gather(x, order), state)
        hidden, attention = recurrence.recurrence(
            sorted_state.features, sorted_state.keys, sorted_state.hidden,
            self.word_gates(tf.gather_nd(inputs, index), training),
            self.loop_weights(), self.config.gate, active=active, fused=fused)
        return Packed(hidden, attention, tf.gather_nd(targets, index), caption)


def _fused_recurrent_init(units, gate):
    glorot, orthogonal = keras.initializers.GlorotUniform(), keras.initializers.Orthogonal()

    def init(shape, dtype=None):
        parts = [glorot((units, units), dtype=dtype),               # W2 (attention query)
                 orthogonal((units, 3 * units), dtype=dtype)]       # GRU recurrent, as Keras
        if gate:
            parts.append(glorot((units, 1), dtype=dtype))           # f_beta
        return keras.ops.concatenate(parts, axis=1)
    return init
