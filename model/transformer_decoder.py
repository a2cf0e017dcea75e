"""Word side, second family: a Transformer decoder over the image grid (`--decoder transformer`),
the decoder of TensorFlow's current captioning tutorial at this project's width.

Each of `layers` blocks (pre-norm, x [B, T, D], D = units, `heads` heads of D / heads):
    x += Wo  softmax(q k^T / sqrt(d) + causal mask) v     self-attention over the words so far
    x += Wo' softmax(q' m_k^T / sqrt(d)) m_v               cross-attention over the grid's cells
    x += W2 relu(W1 LN(x))                                 feed-forward, ff_units wide
    logits = fc(LN(x))                                     cast to float32, as the GRU's
Words enter as embedding * sqrt(D) + a sinusoidal position (no length limit); the grid's cells
as the encoded features (already standardised and projected by the encoder) + a learned
embedding per cell (where a thing is in the picture is what the position words of a caption
need); a LayerNorm there instead cost the copy task of tests/test_transformer.py most of its
held-out accuracy (99% -> 55-81%). Dropout on the input and on every sub-layer's output.

Teacher forcing is one pass over the whole caption with a causal mask. Decoding runs one word
at a time with a cache: the state holds, per block, the keys and values of the words so far
([B, H, t, d], one more each step) and of the grid (made once per image), so a step computes
the new word's projections only and attends over the cache. Step and teacher forcing share the
same block code (a step is a pass over one position after a prefix).

The attention a caller sees (plots, the page, TensorBoard samples, attention correctness and
the doubly stochastic regulariser) is the last block's cross-attention averaged over heads.
"""
import collections
import math

import keras
import tensorflow as tf

from model.decoders import Packed, any_batch, caption_ends

# memory: per block (keys, values) of the grid, [B, H, P, d], fixed per image; cache: per block
# (keys, values) of the words so far, [B, H, t, d]. The next word's position is t.
TransformerState = collections.namedtuple("TransformerState", ["memory", "cache"])

_MASKED = -1e9   # added to the scores of later words (exp of it is exactly 0 in float32)


class TransformerDecoder(keras.layers.Layer):

    def __init__(self, config, **kw):
        super().__init__(**kw)
        c = self.config = config
        policy = self.dtype_policy
        # N(0, 1/D), times sqrt(D) at the input: words and positions start at the same scale.
        self.embedding = keras.layers.Embedding(
            c.vocab_size, c.units, name="embedding", dtype=policy,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=c.units ** -0.5))
        self.input_dropout = keras.layers.Dropout(c.dropout, name="input_dropout", dtype=policy)
        # One attribute each: a checkpoint follows attributes, not the layers in a list.
        for i in range(c.layers):
            setattr(self, f"block_{i}", _Block(c, name=f"block_{i}", dtype=policy))
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm", dtype=policy)
        # The vocabulary projection in the compute dtype, as the GRU's; logits cast to float32.
        self.fc = keras.layers.Dense(c.vocab_size, name="fc", dtype=policy)

    def build(self, input_shape=None):
        c = self.config
        self.embedding.build((None,))
        self.cell_embedding = self.add_weight(shape=(c.num_positions, c.embedding_dim), name="cell_embedding",
                                              initializer=keras.initializers.RandomNormal(stddev=0.02))
        for block in self.blocks:
            block.build()
        self.final_norm.build((None, None, c.units))
        self.fc.build((None, c.units))
        self.built = True

    @property
    def blocks(self):
        return tuple(getattr(self, f"block_{i}") for i in range(self.config.layers))

    # ------------------------------------------------------------------ pieces
    def _words(self, tokens, start, training):
        """tokens [B, T] at positions start.. -> block input [B, T, D]."""
        d = self.config.units
        x = self.embedding(tokens) * tf.cast(math.sqrt(d), self.compute_dtype)
        x = x + tf.cast(sinusoid(start, tf.shape(tokens)[1], d), x.dtype)[None]
        return self.input_dropout(x, training=training)

    def _run(self, x, prefixes, memory, mask, training):
        """The blocks over x [B, T, D] -> (normalised outputs, new (keys, values) per block,
        the last block's cross-attention averaged over heads [B, T, P] float32)."""
        cache = []
        for block, prefix, grid in zip(self.blocks, prefixes, memory):
            x, kv, cross = block(x, prefix=prefix, grid=grid, bias=mask, training=training)
            cache.append(kv)
        return self.final_norm(x), tuple(cache), tf.reduce_mean(cross, axis=1)

    def logits(self, outputs, training=False):
        """Normalised outputs [..., D] -> float32 logits [..., V]."""
        del training
        return tf.cast(self.fc(outputs), tf.float32)

    # ------------------------------------------------------------------ public
    def initial_state(self, encoded):
        """Encoded features [B, P, E] -> each block's grid keys and values, and an empty cache."""
        grid = encoded + tf.cast(self.cell_embedding, encoded.dtype)
        memory = tuple(block.grid_keys_values(grid) for block in self.blocks)
        batch, heads = tf.shape(encoded)[0], self.config.heads
        empty = tf.zeros([batch, heads, 0, self.config.units // heads], self.compute_dtype)
        return TransformerState(memory=memory, cache=tuple((empty, empty) for _ in self.blocks))

    def step(self, state, prev_tokens, training=False):
        """prev_tokens [B] -> (logits [B, V] float32, state with the word's keys and values
        cached, attention [B, P] float32)."""
        start = tf.shape(state.cache[0][0])[2]
        x = self._words(prev_tokens[:, None], start, training)
        outputs, cache, attention = self._run(x, state.cache, state.memory, None, training)
        return self.logits(outputs[:, 0], training), state._replace(cache=cache), attention[:, 0]

    def reorder(self, state, rows):
        """Beam search: the cached words of row rows[i] into row i (the grid's keys and values
        are the same in every beam of an image, so they stay)."""
        return state._replace(cache=tf.nest.map_structure(lambda x: tf.gather(x, rows), state.cache))

    def state_invariants(self, state):
        """The batch changes in a loop, and the cache grows by a word a step."""
        return TransformerState(
            memory=any_batch(state.memory),
            cache=tf.nest.map_structure(lambda x: tf.TensorShape([None, x.shape[1], None, x.shape[3]]),
                                        state.cache))

    def teacher_forced_outputs(self, state, inputs, training=False):
        """inputs [B, T] -> (normalised outputs [B, T, D], attention [B, T, P] float32): every
        position in one pass, each seeing only the words before it."""
        steps = tf.shape(inputs)[1]
        later = tf.range(steps)[None, :] > tf.range(steps)[:, None]           # [T, T]: key after query
        mask = tf.where(later, _MASKED, 0.0)
        outputs, _, attention = self._run(self._words(inputs, 0, training), state.cache, state.memory,
                                          mask, training)
        return outputs, attention

    def teacher_forced(self, state, inputs, training=False):
        """inputs [B, T] -> (logits [B, T, V] float32, attention [B, T, P] float32)."""
        outputs, attention = self.teacher_forced_outputs(state, inputs, training)
        return self.logits(outputs, training), attention

    def packed_teacher_forced(self, state, inputs, targets, training=False, fused=False):
        """Teacher forcing up to the longest caption's end, then the real positions only (the
        vocabulary projection and the loss skip padding). -> Packed, rows batch-major."""
        del fused  # no fused kernels here
        _, longest = caption_ends(targets)                     # trailing pad columns: skipped
        outputs, attention = self.teacher_forced_outputs(state, inputs[:, :longest], training)
        where = tf.where(tf.not_equal(targets[:, :longest], 0))                  # [N, 2]
        return Packed(tf.gather_nd(outputs, where), tf.gather_nd(attention, where),
                      tf.gather_nd(targets, where), tf.cast(where[:, 0], tf.int32))


class _Block(keras.layers.Layer):
    """Self-attention, cross-attention over the grid, feed-forward; each pre-norm and residual."""

    def __init__(self, config, **kw):
        super().__init__(**kw)
        c = self.config = config
        policy = self.dtype_policy
        dense = lambda width, name, **more: keras.layers.Dense(width, name=name, dtype=policy, **more)
        norm = lambda name: keras.layers.LayerNormalization(epsilon=1e-6, name=name, dtype=policy)
        self.self_norm, self.cross_norm, self.ff_norm = norm("self_norm"), norm("cross_norm"), norm("ff_norm")
        # The attention's projections have no bias: a key bias adds the same to every score of
        # a query (the softmax ignores it, so its true gradient is 0 and Adam would only move it
        # by rounding noise), and the pre-norm input makes the others redundant.
        self.qkv = dense(3 * c.units, "qkv", use_bias=False)           # q, k, v of the words, one matmul
        self.self_out = dense(c.units, "self_out")
        self.cross_query = dense(c.units, "cross_query", use_bias=False)
        self.grid_kv = dense(2 * c.units, "grid_kv", use_bias=False)   # k, v of the cells, once per image
        self.cross_out = dense(c.units, "cross_out")
        self.ff_in = dense(c.ff_units, "ff_in", activation="relu")
        self.ff_out = dense(c.units, "ff_out")
        self.dropout = keras.layers.Dropout(c.dropout, name="dropout", dtype=policy)

    def build(self, input_shape=None):
        c = self.config
        for layer, width in ((self.self_norm, c.units), (self.cross_norm, c.units), (self.ff_norm, c.units),
                             (self.qkv, c.units), (self.self_out, c.units), (self.cross_query, c.units),
                             (self.grid_kv, c.embedding_dim), (self.cross_out, c.units),
                             (self.ff_in, c.units), (self.ff_out, c.ff_units)):
            layer.build((None, None, width))
        self.built = True

    def _heads(self, x):
        """[B, T, D] -> [B, H, T, D / H]. One position (a decoding step): a reshape alone."""
        h = self.config.heads
        shape = tf.shape(x)
        if x.shape[1] == 1:
            return tf.reshape(x, tf.stack([shape[0], h, 1, self.config.units // h]))
        x = tf.reshape(x, tf.stack([shape[0], shape[1], h, self.config.units // h]))
        return tf.transpose(x, [0, 2, 1, 3])

    def _merge(self, x):
        """[B, H, T, d] -> [B, T, H * d]."""
        shape = tf.shape(x)
        if x.shape[2] == 1:
            return tf.reshape(x, tf.stack([shape[0], 1, self.config.units]))
        return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), tf.stack([shape[0], shape[2], self.config.units]))

    def grid_keys_values(self, grid):
        """Normalised cells [B, P, E] -> (keys, values) [B, H, P, d]."""
        k, v = tf.split(self.grid_kv(grid), 2, axis=-1)
        return self._heads(k), self._heads(v)

    def call(self, x, prefix, grid, bias, training=False):
        """x [B, T, D] after `prefix` (keys, values) [B, H, t, d] of the earlier words; grid the
        cells' (keys, values); bias [T, t + T] additive (the causal mask), or None (one position: sees all).
        -> (x, (keys, values) of the t + T words, cross-attention [B, H, T, P] float32)."""
        q, k, v = tf.split(self.qkv(self.self_norm(x)), 3, axis=-1)
        if prefix[0].shape[2] == 0:   # no earlier word (teacher forcing): nothing to append to
            keys, values = self._heads(k), self._heads(v)
        else:
            keys = tf.concat([prefix[0], self._heads(k)], axis=2)
            values = tf.concat([prefix[1], self._heads(v)], axis=2)
        words, _ = attend(self._heads(q), keys, values, bias)
        x = x + self.dropout(self.self_out(self._merge(words)), training=training)
        cells, weights = attend(self._heads(self.cross_query(self.cross_norm(x))), grid[0], grid[1], None)
        x = x + self.dropout(self.cross_out(self._merge(cells)), training=training)
        x = x + self.dropout(self.ff_out(self.ff_in(self.ff_norm(x))), training=training)
        return x, (keys, values), weights


def attend(q, k, v, mask):
    """Scaled dot-product attention, q [B, H, Tq, d], k, v [B, H, Tk, d], mask [Tq, Tk] additive
    or None -> (output [B, H, Tq, d], weights [B, H, Tq, Tk] float32). The softmax in float32."""
    scores = tf.matmul(q, k, transpose_b=True)
    scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores += tf.cast(mask, tf.float32)
    weights = tf.nn.softmax(scores, axis=-1)
    return tf.matmul(tf.cast(weights, v.dtype), v), weights


def sinusoid(start, count, width):
    """The sinusoidal encodings of positions start .. start + count - 1 -> [count, width] float32
    (sines in the first half, cosines in the second, as in Vaswani et al.)."""
    position = tf.cast(tf.range(start, start + count), tf.float32)[:, None]
    half = (width + 1) // 2
    rate = tf.pow(10000.0, -tf.range(half, dtype=tf.float32) * 2.0 / width)
    angle = position * rate[None, :]
    return tf.concat([tf.sin(angle), tf.cos(angle)], axis=1)[:, :width]
