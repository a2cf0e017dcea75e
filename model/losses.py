"""Training loss: masked cross-entropy + the doubly stochastic attention regulariser.

Both parts are sums over the batch divided by ONE denominator, the number of real tokens
(or `global_token_count`, the count over all replicas). So

    loss = (sum_captions NLL(caption) + lambda * sum_captions R(caption)) / tokens,
    R(caption) = sum_i (1 - sum_t alpha_ti)^2 over the caption's real steps t,

which is the paper's per-caption objective (-log p + lambda R) summed over the batch and scaled
by the token count. Per-replica losses built this way add up to the global loss exactly,
whether the batch is split over 1 or 8 replicas.
"""
import collections

import tensorflow as tf

PAD_ID = 0

CaptionLoss = collections.namedtuple("CaptionLoss", ["loss", "xent", "reg"])


def caption_loss(logits, targets, attention, attention_reg, global_token_count=None):
    """logits [B, T, V], targets [B, T] int (0 = pad), attention [B, T, P].

    Returns CaptionLoss(loss, xent, reg), float32 scalars with loss = xent + reg.
    """
    mask = _mask(targets)
    denominator = _denominator(mask, global_token_count)
    token_xent = sparse_xent(tf.cast(logits, tf.float32), targets)
    xent = tf.reduce_sum(token_xent * mask) / denominator
    reg = _regulariser(attention, mask, attention_reg) / denominator
    return CaptionLoss(xent + reg, xent, reg)


def packed_caption_loss(logits, targets, attention, caption, num_captions, attention_reg,
                        global_token_count=None):
    """The same loss on packed rows (see AttentionGRUDecoder.packed_teacher_forced):
    logits [N, V], targets [N], attention [N, P], caption [N] = each row's caption in
    [0, num_captions). Rows with target 0 are masked as in caption_loss."""
    mask = _mask(targets)                                           # [N]
    denominator = _denominator(mask, global_token_count)
    token_xent = sparse_xent(tf.cast(logits, tf.float32), targets)
    xent = tf.reduce_sum(token_xent * mask) / denominator
    if _is_zero(attention_reg):
        reg = tf.constant(0.0)
    else:
        coverage = tf.math.unsorted_segment_sum(
            tf.cast(attention, tf.float32) * mask[:, None], caption, num_captions)
        tokens = tf.math.unsorted_segment_sum(mask, caption, num_captions)
        reg = _penalty(coverage, tokens, attention_reg) / denominator
    return CaptionLoss(xent + reg, xent, reg)


def sparse_xent(logits, labels):
    """-log softmax(logits)[label] for each row: logits [..., V] float32, labels [...] int.

    tf.nn.sparse_softmax_cross_entropy_with_logits' value and gradient, computed from the
    softmax op (on CPU oneDNN's softmax is well over twice as fast as the fused cross-entropy
    op on a batch's logits: figures in docs/ARCHITECTURE.md). The log-sum-exp comes from the largest probability,
    lse = max(logits) - log(max(p)), which is >= 1/V and so never underflows: the loss stays
    exact where -log(p[label]) would be inf.
    """
    labels = tf.cast(labels, tf.int32)
    rows = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
    flat = tf.reshape(labels, [-1])

    @tf.custom_gradient
    def xent(rows):
        probs = tf.nn.softmax(rows)
        lse = tf.reduce_max(rows, -1) - tf.math.log(tf.reduce_max(probs, -1))
        value = lse - tf.gather(rows, flat, batch_dims=1)

        def grad(upstream):
            # (p - onehot) * dy: the product is a new tensor, so the scatter updates it in
            # place (probs itself is still referenced and would be copied).
            at_label = tf.stack([tf.range(tf.shape(flat)[0]), flat], 1)
            return tf.tensor_scatter_nd_sub(probs * upstream[:, None], at_label, upstream)
        return value, grad

    return tf.reshape(xent(rows), tf.shape(labels))


def _mask(targets):
    return tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)       # [B, T]


def _denominator(mask, global_token_count):
    if global_token_count is None:
        count = tf.reduce_sum(mask)
    else:
        count = tf.cast(global_token_count, tf.float32)
    return tf.maximum(count, 1.0)   # an all-pad batch gives 0, not NaN


def _is_zero(attention_reg):
    # A Python 0 skips the computation; a tensor lambda (a schedule) is always applied.
    return isinstance(attention_reg, (int, float)) and attention_reg == 0


def _regulariser(attention, mask, attention_reg):
    """lambda * sum over captions of sum_i (1 - sum_t alpha_ti)^2, real steps only."""
    if _is_zero(attention_reg):
        return tf.constant(0.0)
    coverage = tf.reduce_sum(tf.cast(attention, tf.float32) * mask[:, :, None], axis=1)
    return _penalty(coverage, tf.reduce_sum(mask, axis=1), attention_reg)


def _penalty(coverage, tokens, attention_reg):
    """coverage [C, P] = sum_t alpha_t over real steps, tokens [C] = real steps a caption."""
    per_caption = tf.reduce_sum(tf.square(1.0 - coverage), axis=1)          # [C]
    # A caption with no real step (padding rows of a distributed batch) adds nothing.
    has_tokens = tf.cast(tokens > 0, tf.float32)
    return tf.cast(attention_reg, tf.float32) * tf.reduce_sum(per_caption * has_tokens)
