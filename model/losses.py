"""Training loss: masked cross-entropy + the doubly stochastic attention regulariser.

Both parts are sums over the batch divided by ONE denominator, the number of real tokens
(or `global_token_count`, the count over all replicas). So

    loss = (sum_captions NLL(caption) + lambda * sum_captions R(caption)) / tokens,
    R(caption) = sum_i (1 - sum_t alpha_ti)^2 over the caption's real steps t,

which is the paper's per-caption objective (-log p + lambda R) summed over the batch and scaled
by the token count. Summing per-replica losses built this way gives the global loss exactly,
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
    logits = tf.cast(logits, tf.float32)
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)                # [B, T]
    if global_token_count is None:
        denominator = tf.reduce_sum(mask)
    else:
        denominator = tf.cast(global_token_count, tf.float32)
    denominator = tf.maximum(denominator, 1.0)   # an all-pad batch gives 0, not NaN

    token_xent = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.int32), logits=logits)
    xent = tf.reduce_sum(token_xent * mask) / denominator

    # A Python 0 skips the computation; a tensor lambda (a schedule) is always applied.
    if not (isinstance(attention_reg, (int, float)) and attention_reg == 0):
        attention = tf.cast(attention, tf.float32)
        coverage = tf.reduce_sum(attention * mask[:, :, None], axis=1)       # [B, P]
        per_caption = tf.reduce_sum(tf.square(1.0 - coverage), axis=1)      # [B]
        # A caption with no real step (padding rows of a distributed batch) adds nothing.
        has_tokens = tf.cast(tf.reduce_any(mask > 0, axis=1), tf.float32)
        reg = attention_reg * tf.reduce_sum(per_caption * has_tokens) / denominator
    else:
        reg = tf.constant(0.0)
    return CaptionLoss(xent + reg, xent, reg)
