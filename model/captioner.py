"""The captioner: FeatureEncoder + the decoder config.decoder names (model/decoders.py) behind
the API trainer and export use.

    model = Captioner(config, feature_mean, feature_std)
    logits, attention = model.teacher_forced(features, tokens, training=True)   # training
    state = model.init_state(features)                                           # decoding
    logits, state, attention = model.step(state, prev_tokens)
    state = model.reorder(state, rows)                                           # beam search
    loss, xent, reg = model.teacher_forced_loss(features, tokens, training=True)  # fast path

features: [B, P, F] float16/32; tokens: [B, T] int (0 = <pad>, column 0 = <start>).
teacher_forced predicts tokens[:, 1:] from tokens[:, :-1] and equals T-1 calls of step.

Word dropout (config.word_dropout, training only): each word the decoder is fed as the previous
one is replaced by <unk> with that probability, the targets left as they are. The decoder then
has to name the next word from the picture more often than from the words before it, which is
what a colour-shape pair never seen together needs (docs/training.md, "Captions of new
combinations").
"""
import keras
import tensorflow as tf

from caption_io.vocab import END_ID, UNK_ID
from model import decoders, losses
from model.config import CaptionerConfig
from model.encoder import FeatureEncoder


class WordDropout(keras.layers.Layer):
    """In training, each word token (not <pad>, <start> or <end>) -> <unk> with probability `rate`."""

    def __init__(self, rate: float, **kw):
        super().__init__(**kw)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, tokens, training=False):
        if not training or self.rate == 0:
            return tokens
        drop = keras.random.uniform(tf.shape(tokens), seed=self.seed_generator) < self.rate
        return tf.where(drop & (tokens > END_ID), tf.cast(UNK_ID, tokens.dtype), tokens)


class Captioner(keras.Model):

    def __init__(self, config, feature_mean=None, feature_std=None, **kw):
        """feature_mean/std: per-channel training-split statistics, shape [feature_dim].

        None leaves them at 0 / 1: only for a model whose weights are then restored from a
        checkpoint or weights file, which carries the real statistics.
        """
        policy = "mixed_bfloat16" if config.compute_dtype == "bfloat16" else "float32"
        super().__init__(dtype=policy, **kw)
        self.config = config
        self.encoder = FeatureEncoder(config.embedding_dim, config.feature_dim, feature_mean,
                                      feature_std, name="encoder", dtype=policy)
        self.decoder = decoders.make(config, name="decoder", dtype=policy)
        self.word_dropout = WordDropout(config.word_dropout, name="word_dropout") if config.word_dropout else None
        # Build now, from the config alone: variables exist before any data is seen, so an
        # optimizer or a checkpoint restore can be set up straight away.
        self.encoder.build((None, config.num_positions, config.feature_dim))
        self.decoder.build()
        self.built = True

    def init_state(self, features, training=False):
        """Per-image work, done once: the encoded features and what the decoder derives from
        them (the GRU: attention keys, h_0; the Transformer: the grid's keys and values)."""
        del training  # nothing stochastic on the image side
        return self.decoder.initial_state(self.encoder(features))

    def step(self, state, prev_tokens, training=False):
        """prev_tokens [B] -> (logits [B, V] float32, new state, attention [B, P] float32)."""
        return self.decoder.step(state, prev_tokens, training)

    def reorder(self, state, rows):
        """The state with row i holding row rows[i]'s history (beam search's parents)."""
        return self.decoder.reorder(state, rows)

    def state_invariants(self, state):
        """The state's shapes as a decoding loop may change them (tf.while_loop's invariants)."""
        return self.decoder.state_invariants(state)

    def teacher_forced(self, features, tokens, training=False):
        """-> (logits [B, T-1, V] float32, attention [B, T-1, P] float32)."""
        state = self.init_state(features, training)
        return self.decoder.teacher_forced(state, self._inputs(tokens, training), training)

    def _inputs(self, tokens, training):
        """The words fed to the decoder (tokens[:, :-1]), with word dropout in training."""
        inputs = tokens[:, :-1]
        return self.word_dropout(inputs, training=training) if self.word_dropout is not None else inputs

    def teacher_forced_loss(self, features, tokens, training=False, attention_reg=None,
                            global_token_count=None, fused_attention=False):
        """The training loss, fast path: caption_loss(*teacher_forced(...)) computed on real
        positions only: captions are packed by length, so padded steps cost nothing, in the
        time loop or in the vocabulary projection. -> CaptionLoss(loss, xent, reg).

        attention_reg defaults to config.attention_reg. Packing gives data-dependent shapes,
        so this is not for jit_compile=True; teacher_forced + caption_loss is.
        fused_attention: the time loop's attention in the CPU kernels of
        model/fused_attention.py (see fused_attention.resolve).
        """
        if attention_reg is None:
            attention_reg = self.config.attention_reg
        state = self.init_state(features, training)
        packed = self.decoder.packed_teacher_forced(state, self._inputs(tokens, training), tokens[:, 1:],
                                                    training, fused=fused_attention)
        return losses.packed_caption_loss(
            self.decoder.logits(packed.outputs, training), packed.targets, packed.attention,
            packed.caption, tf.shape(tokens)[0], attention_reg, global_token_count)

    def call(self, inputs, training=False):
        features, tokens = inputs
        return self.teacher_forced(features, tokens, training=training)

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(CaptionerConfig.from_dict(config.pop("config")), **config)
