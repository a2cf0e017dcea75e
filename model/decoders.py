"""The decoder families and what each one offers the rest of the code.

A family is one module with one Keras layer; `make(config)` builds the one `config.decoder`
names. Decoding (greedy, beam search, sampling and their controls), SCST, the export, the
per-epoch metrics and the plots see a decoder only through these methods:

    state = decoder.initial_state(encoded)            per-image work, once: [B, P, E] -> state
    logits, state, attention = decoder.step(state, prev_tokens, training)
                                                      prev_tokens [B] -> logits [B, V] float32,
                                                      attention over the grid [B, P] float32
    state = decoder.reorder(state, rows)              beam search: each row takes row `rows[i]`'s
                                                      history (per-image parts need not move)
    shapes = decoder.state_invariants(state)          the state's shapes as tf.while_loop may
                                                      change them (batch, and any growing dim)
    logits, attention = decoder.teacher_forced(state, inputs, training)
                                                      inputs [B, T] -> [B, T, V], [B, T, P];
                                                      equals T calls of step
    packed = decoder.packed_teacher_forced(state, inputs, targets, training, fused)
                                                      real positions only -> Packed, then
    logits = decoder.logits(packed.outputs, training) the training loss's path

A state is a namedtuple (of tensors, or of tuples of tensors) whose tensors have the batch
first: decoding tiles it per beam and SCST per draw with tf.repeat. `fused=True` asks for
model/fused_attention.py's CPU kernels, which compute the GRU's attention; other families ignore it.
"""
import collections

import tensorflow as tf

# Teacher forcing on real positions only (the training loss and SCST's log-probabilities):
# outputs [N, width], attention [N, P], targets [N], caption [N] = each row's index in the
# batch; rows in any order (the loss sums them by caption).
Packed = collections.namedtuple("Packed", ["outputs", "attention", "targets", "caption"])


def _families():
    # Imported on use: the families import this module for Packed.
    from model.gru_decoder import AttentionGRUDecoder
    from model.transformer_decoder import TransformerDecoder
    return {"gru": AttentionGRUDecoder, "transformer": TransformerDecoder}


def any_batch(structure):
    """Shape invariants for a state whose batch dim alone may change in a loop."""
    return tf.nest.map_structure(lambda x: tf.TensorShape([None]) + x.shape[1:], structure)


def caption_ends(targets):
    """targets [B, T] (0 = <pad>) -> [B] int32: each caption's length up to its last real target
    (what packed teacher forcing runs), and the longest of them (0 for an empty batch)."""
    steps = tf.shape(targets)[1]
    ends = tf.reduce_max(tf.where(tf.not_equal(targets, 0), tf.range(1, steps + 1)[None, :], 0), axis=1)
    return ends, tf.reduce_max(tf.concat([ends, [0]], 0))


NAMES = ("gru", "transformer")   # config.decoder's choices; the first is the default


def make(config, **kw):
    """The decoder layer of config.decoder (checked by CaptionerConfig)."""
    return _families()[config.decoder](config, **kw)
