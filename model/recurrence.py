"""The attention-GRU time loop, with a hand-written backward pass (BPTT).

Per step (h = h_{t-1}; g_t = the word's share of the GRU input gates, computed for all steps
before the loop):
    pre      = h @ K + c = [q | hz | hr | hn | (b)]   one matmul: W2 h, GRU recurrent, f_beta
    ctx, a   = attention(keys + q)                     (ctx *= sigmoid(b) if gate)
    gx       = g_t + ctx @ Kc = [xz | xr | xn]
    z, r     = sigmoid(xz + hz), sigmoid(xr + hr)
    n        = tanh(xn + r * hn)
    h_t      = n + z * (h - n)                         (Keras/cuDNN "reset_after" GRU)

Packed sequences: rows are sorted by caption length (longest first) and step t runs only
the first active[t] rows, like cuDNN's packed RNN; the per-step tensors are "packed": the
rows of all steps concatenated, time-major, [N = sum_t active[t], ...]. Padded positions
cost nothing. With active[t] = B for every t this is the plain dense loop.

Why a custom gradient: autodiff of a tf.while_loop computes every weight gradient inside the
backward loop, one [U, 64] x [64, 4U] matmul per step plus a read-modify-write of a [U, 4U]
accumulator. Here the backward loop only carries what is truly recurrent (dh, and the
per-image dkeys sum); it stacks the per-step pre-activation gradients, and the weight
gradients are single [U, T*B] x [T*B, 4U] matmuls after it, as cuDNN's RNN does. The same
for dfeatures (one batched matmul over the stacked attention weights and context gradients).
tests/test_model.py checks these gradients against autodiff of the same forward.

fused=True computes the attention and its gradient with the CPU kernels of
model/fused_attention.py (one pass over the [n, P, U] tensors each) instead of TensorFlow
ops; same arithmetic, for training on CPUs. In bfloat16 they also keep the per-image dkeys
and dv sums in float32, where the ops add each step's bfloat16 share in bfloat16.
"""
import collections

import tensorflow as tf

from model import fused_attention
from model.attention import attend

# The loop's weights, already cast to the compute dtype.
LoopWeights = collections.namedtuple(
    "LoopWeights", ["recurrent_kernel", "recurrent_bias", "context_kernel", "v"])


def cell(features, keys, hidden, word_gates, w, gate, attend_fn=attend):
    """One step. Returns h_t, attention [B, P] (float32) and what the backward pass needs."""
    units = keys.shape[-1]
    pre = tf.matmul(hidden, w.recurrent_kernel) + w.recurrent_bias
    query = pre[:, :units]
    context, alpha, att_hidden = attend_fn(features, keys, query, w.v)
    gated = context * tf.sigmoid(pre[:, 4 * units:]) if gate else context
    gx = word_gates + tf.matmul(gated, w.context_kernel)
    z, r, n = _gates(pre, gx, units)
    return n + z * (hidden - n), alpha, (pre, gx, context, att_hidden)


def _gates(pre, gx, units):
    hz, hr, hn = pre[:, units:2 * units], pre[:, 2 * units:3 * units], pre[:, 3 * units:4 * units]
    xz, xr, xn = tf.split(gx, 3, axis=-1)
    z = tf.sigmoid(xz + hz)
    r = tf.sigmoid(xr + hr)
    return z, r, tf.tanh(xn + r * hn)


def recurrence(features, keys, h0, word_gates, w, gate, active=None, fused=False):
    """features [B, P, E], keys [B, P, U], h0 [B, U]; word_gates packed [N, 3U], time-major.

    active: None (dense: every row runs every step, N = T * B) or [T] int32, non-increasing,
    the number of rows running at step t; rows must be sorted so that those are the first
    ones, and step t's word_gates rows are [offset_t, offset_t + active[t]).
    Returns packed hidden states [N, U] and attention weights [N, P] (float32). T may be
    dynamic: one tf.while_loop, traced once.
    """
    layout = _Layout(h0, word_gates, active)

    @tf.custom_gradient
    def run(features, keys, h0, word_gates, rec_kernel, rec_bias, ctx_kernel, v):
        w = LoopWeights(rec_kernel, rec_bias, ctx_kernel, v)
        outputs, saved = _forward(layout, features, keys, h0, word_gates, w, gate, fused)

        def grad(d_hidden, d_attention):
            return _backward(layout, features, keys, h0, w, gate, outputs, saved,
                             d_hidden, d_attention, fused)
        return outputs, grad

    return run(features, keys, h0, word_gates, *w)


class _Layout:
    """Which rows run at step t, and where they sit in packed [N, ...] tensors.

    The dense case is kept free of data-dependent slices (so that it also compiles with XLA).
    """

    def __init__(self, h0, word_gates, active):
        self.batch = tf.shape(h0)[0]
        self.dense = active is None
        if self.dense:
            self.steps = tf.shape(word_gates)[0] // self.batch
        else:
            self.active = tf.cast(active, tf.int32)
            self.offsets = tf.cumsum(self.active, exclusive=True)
            self.steps = tf.shape(self.active)[0]

    def first(self, x, t):
        """The running rows of a per-caption tensor [B, ...] (shares its buffer)."""
        return x if self.dense else x[:self.active[t]]

    def merge(self, running, total, t):
        """total [B, ...] with its running rows replaced by `running`."""
        if self.dense:
            return running
        return _like(tf.concat([running, total[self.active[t]:]], 0), total)

    def steps_view(self, packed):
        """A packed tensor prepared for `at` (dense: split into [T, B, ...])."""
        if not self.dense:
            return packed
        return tf.reshape(packed, tf.concat([[self.steps, self.batch], tf.shape(packed)[1:]], 0))

    def at(self, view, t):
        if self.dense:
            return view[t]
        return view[self.offsets[t]:self.offsets[t] + self.active[t]]

    def update_first(self, total, part, t):
        """total [B, ...] with part added to its running rows."""
        if self.dense:
            return total + part
        n = self.active[t]
        return _like(tf.cond(n < self.batch,
                             lambda: tf.concat([total[:n] + part, total[n:]], 0),
                             lambda: total + part), total)

    def arrays(self, *specs):
        # infer_shape=False: packed steps have different row counts. clear_after_read=False:
        # the backward pass reads some twice (eagerly, a read would clear the element).
        return tuple(tf.TensorArray(dtype, size=self.steps, element_shape=[None] + list(shape),
                                    infer_shape=self.dense, clear_after_read=False)
                     for dtype, shape in specs)

    def join(self, array):
        """TensorArray of per-step rows -> packed [N, ...]."""
        if self.dense:
            stacked = array.stack()
            return tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))
        return array.concat()

    def previous(self, h0, hidden):
        """h_{t-1} for every packed row: packed row j's previous state."""
        if self.dense:
            return tf.concat([h0, hidden], 0)[:tf.shape(hidden)[0]]
        step, row = self.coordinates(tf.shape(hidden)[0])
        prev_start = tf.gather(self.offsets, tf.maximum(step - 1, 0)) + self.batch
        return tf.gather(tf.concat([h0, hidden], 0), tf.where(step > 0, prev_start, 0) + row)

    def coordinates(self, rows):
        step = tf.repeat(tf.range(self.steps), self.active)
        return step, tf.range(rows) - tf.gather(self.offsets, step)

    def per_caption(self, packed):
        """packed [N, D] -> [B, T, D], zeros where a caption was not running."""
        if self.dense:
            return tf.transpose(self.steps_view(packed), [1, 0, 2])
        step, row = self.coordinates(tf.shape(packed)[0])
        return tf.scatter_nd(tf.stack([row, step], 1), packed,
                             tf.stack([self.batch, self.steps, packed.shape[-1]]))


def _like(x, reference):
    """x with reference's static shape (a concat of dynamic slices loses it)."""
    x.set_shape(reference.shape)
    return x


def _forward(layout, features, keys, h0, word_gates, w, gate, fused):
    dt = h0.dtype
    u, p, e = keys.shape[-1], keys.shape[1], features.shape[-1]
    arrays = layout.arrays((dt, [u]), (tf.float32, [p]),                   # outputs: h_t, alpha
                           (dt, [w.recurrent_kernel.shape[-1]]), (dt, [3 * u]),  # saved: pre,
                           (dt, [e]), (dt, [p, u]))                  # gx, context, tanh(k + q)
    word_gates = layout.steps_view(word_gates)
    attend_fn = fused_attention.attend if fused else attend

    def body(t, hidden, arrays):
        h, alpha, saved = cell(layout.first(features, t), layout.first(keys, t),
                               layout.first(hidden, t), layout.at(word_gates, t), w, gate,
                               attend_fn)
        arrays = tuple(a.write(t, x) for a, x in zip(arrays, (h, alpha) + saved))
        # Rows that have finished keep their (no longer used) state: shapes stay fixed.
        return t + 1, layout.merge(h, hidden, t), arrays

    _, _, arrays = tf.while_loop(lambda t, *_: t < layout.steps, body, (0, h0, arrays),
                                 maximum_iterations=layout.steps)
    return (layout.join(arrays[0]), layout.join(arrays[1])), arrays[2:]


def _gru_grad(pre, gx, hp, dh, u):
    """One step's GRU gradient from d h_t, where h_t = n + z (h - n): -> (z, r, dz, dr, dn, d_gx)."""
    z, r, n = _gates(pre, gx, u)
    hn = pre[:, 3 * u:4 * u]
    dn = tf.raw_ops.TanhGrad(y=n, dy=dh * (1 - z))                      # d(xn + r hn)
    dz = tf.raw_ops.SigmoidGrad(y=z, dy=dh * (hp - n))
    dr = tf.raw_ops.SigmoidGrad(y=r, dy=dn * hn)
    return z, r, dz, dr, dn, tf.concat([dz, dr, dn], -1)


def _attention_grad(layout, features, t, att, a, d_ctx, d_a, v, d_keys):
    """One step's attention gradient with TensorFlow ops (context = sum_p a_p f_p; softmax;
    scores = tanh(keys + q) . v): -> (d_query, d_v of this step, d_keys with it added)."""
    dt, u = att.dtype, att.shape[-1]
    da = tf.matmul(layout.first(features, t), d_ctx[:, :, None])[:, :, 0]  # [n, P]
    da = tf.cast(da, tf.float32) + d_a
    ds = tf.cast(a * (da - tf.reduce_sum(a * da, -1, keepdims=True)), dt)
    # ds (x) v as a K=1 matmul and the sum over positions as a matmul with ones: both
    # faster than Eigen's broadcast multiply and middle-axis reduction (docs/ARCHITECTURE.md).
    rows = tf.shape(ds)[0]
    ds_v = tf.reshape(tf.matmul(tf.reshape(ds, [-1, 1]), v[None, :]), tf.shape(att))
    d_score_in = tf.raw_ops.TanhGrad(y=att, dy=ds_v)                  # [n, P, U]
    d_keys = layout.update_first(d_keys, d_score_in, t)
    d_v = tf.matmul(tf.reshape(att, [-1, u]), tf.reshape(ds, [-1, 1]), transpose_a=True)[:, 0]
    d_query = tf.matmul(tf.ones(tf.stack([rows, 1, tf.shape(ds)[1]]), dt), d_score_in)[:, 0]
    return d_query, d_v, d_keys


def _backward(layout, features, keys, h0, w, gate, outputs, saved, d_hidden, d_attention,
              fused):
    hidden, alpha = outputs                                                 # packed
    pre_ta, gx_ta, ctx_ta, att_ta = saved
    dt = h0.dtype
    u = keys.shape[-1]
    d_attention = (tf.zeros_like(alpha) if d_attention is None
                   else tf.cast(d_attention, tf.float32))
    d_hidden = tf.zeros_like(hidden) if d_hidden is None else tf.cast(d_hidden, dt)
    h_prev = layout.previous(h0, hidden)
    views = [layout.steps_view(x) for x in (alpha, d_attention, d_hidden, h_prev)]
    kernel_t = tf.transpose(w.recurrent_kernel)
    ctx_kernel_t = tf.transpose(w.context_kernel)
    v = w.v
    arrays = layout.arrays((dt, [w.recurrent_kernel.shape[-1]]), (dt, [3 * u]),
                           (dt, [features.shape[-1]]))

    def body(t, dh, d_keys, d_v, arrays):
        pre, gx, ctx, att = pre_ta.read(t), gx_ta.read(t), ctx_ta.read(t), att_ta.read(t)
        a, d_a, d_h, hp = (layout.at(x, t) for x in views)
        dh_all, dh = dh, layout.first(dh, t) + d_h
        z, r, dz, dr, dn, d_gx = _gru_grad(pre, gx, hp, dh, u)
        d_gated = tf.matmul(d_gx, ctx_kernel_t)                              # [n, E]
        if gate:
            beta = tf.sigmoid(pre[:, 4 * u:])
            d_ctx = d_gated * beta
            d_beta = tf.raw_ops.SigmoidGrad(
                y=beta, dy=tf.reduce_sum(d_gated * ctx, -1, keepdims=True))
        else:
            d_ctx = d_gated
        if fused:  # one pass; d_keys[:n] += d(keys + query) in place
            d_query, d_v_t, d_keys = fused_attention.attend_grad(
                layout.first(features, t), att, a, d_ctx, d_a, v, d_keys)
        else:
            d_query, d_v_t, d_keys = _attention_grad(layout, features, t, att, a, d_ctx, d_a, v, d_keys)
        d_pre = tf.concat([d_query, dz, dr, dn * r] + ([d_beta] if gate else []), -1)
        dh = layout.merge(dh * z + tf.matmul(d_pre, kernel_t), dh_all, t)
        arrays = tuple(x.write(t, y) for x, y in zip(arrays, (d_pre, d_gx, d_ctx)))
        return t - 1, dh, d_keys, d_v + d_v_t, arrays

    sums = tf.float32 if fused else dt    # the dkeys and dv accumulators
    loop_vars = (layout.steps - 1, tf.zeros_like(h0), tf.zeros_like(keys, sums), tf.zeros_like(v, sums),
                 arrays)
    _, dh0, d_keys, d_v, arrays = tf.while_loop(lambda t, *_: t >= 0, body, loop_vars,
                                                maximum_iterations=layout.steps)
    d_keys, d_v = tf.cast(d_keys, dt), tf.cast(d_v, dt)
    d_features, d_gx, d_rec_kernel, d_rec_bias, d_ctx_kernel = _weight_grads(
        layout, alpha, h_prev, pre_ta, ctx_ta, arrays, gate, u)
    return (d_features, d_keys, dh0, d_gx, d_rec_kernel, d_rec_bias, d_ctx_kernel, d_v)


def _weight_grads(layout, alpha, h_prev, pre_ta, ctx_ta, arrays, gate, u):
    """Everything not recurrent, one big matmul each over all packed rows at once: -> (d_features,
    d_gx packed, d_recurrent_kernel, d_recurrent_bias, d_context_kernel). arrays: the loop's
    d_pre, d_gx, d_ctx."""
    d_pre, d_gx, d_ctx = (layout.join(x) for x in arrays)
    ctx = layout.join(ctx_ta)
    if gate:
        ctx = ctx * tf.sigmoid(layout.join(pre_ta)[:, 4 * u:])
    d_rec_kernel = tf.matmul(h_prev, d_pre, transpose_a=True)
    d_rec_bias = tf.reduce_sum(d_pre, 0)
    d_ctx_kernel = tf.matmul(ctx, d_gx, transpose_a=True)
    # d features[b] = sum_t alpha[b, t] d_ctx[b, t]: one batched [P, T] x [T, E] matmul.
    d_features = tf.matmul(layout.per_caption(tf.cast(alpha, d_ctx.dtype)), layout.per_caption(d_ctx),
                           transpose_a=True)
    return d_features, d_gx, d_rec_kernel, d_rec_bias, d_ctx_kernel
