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
first: decoding tiles it per beam and SCST per draw with tf.repeat. `FUSED_KERNELS` says whether
the family runs model/fused_attention.py's CPU kernels (`fused=True`); the others ignore it.
"""
import collections

# Teacher forcing on real positions only (the training loss and SCST's log-probabilities):
# outputs [N, width], attention [N, P], targets [N], caption [N] = each row's index in the
# batch; rows in any order (the loss sums them by caption).
Packed = collections.namedtuple("Packed", ["outputs", "attention", "targets", "caption"])


def _families():
    # Imported on use: the families import this module for Packed.
    from model.gru_decoder import AttentionGRUDecoder
    from model.transformer_decoder import TransformerDecoder
    return {"gru": AttentionGRUDecoder, "transformer": TransformerDecoder}


NAMES = ("gru", "transformer")   # config.decoder's choices; the first is the default


def make(config, **kw):
    """The decoder layer of config.decoder (checked by CaptionerConfig)."""
    return _families()[config.decoder](config, **kw)
