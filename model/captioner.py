"""The captioner: FeatureEncoder + AttentionGRUDecoder behind the API trainer and export use.

    model = Captioner(config, feature_mean, feature_std)
    logits, attention = model.teacher_forced(features, tokens, training=True)   # training
    state = model.init_state(features)                                           # decoding
    logits, state, attention = model.step(state, prev_tokens)

features: [B, P, F] float16/32; tokens: [B, T] int (0 = <pad>, column 0 = <start>).
teacher_forced predicts tokens[:, 1:] from tokens[:, :-1] and equals T-1 calls of step.
"""
import keras

from model.config import CaptionerConfig
from model.decoder import AttentionGRUDecoder, DecoderState
from model.encoder import FeatureEncoder


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
        self.decoder = AttentionGRUDecoder(config, name="decoder", dtype=policy)
        # Build now, from the config alone: variables exist before any data is seen, so an
        # optimizer or a checkpoint restore can be set up straight away.
        self.encoder.build((None, config.num_positions, config.feature_dim))
        self.decoder.build()
        self.built = True

    def init_state(self, features, training=False):
        """Per-image work, done once: encoded features, attention keys, h_0."""
        del training  # nothing stochastic on the image side
        encoded = self.encoder(features)
        return DecoderState(features=encoded,
                            keys=self.decoder.attention.project_features(encoded),
                            hidden=self.decoder.initial_hidden(encoded))

    def step(self, state, prev_tokens, training=False):
        """prev_tokens [B] -> (logits [B, V] float32, new state, attention [B, P] float32)."""
        logits, hidden, attention = self.decoder.step(state, prev_tokens, training)
        return logits, state._replace(hidden=hidden), attention

    def teacher_forced(self, features, tokens, training=False):
        """-> (logits [B, T-1, V] float32, attention [B, T-1, P] float32)."""
        state = self.init_state(features, training)
        return self.decoder.teacher_forced(state, tokens[:, :-1], training)

    def call(self, inputs, training=False):
        features, tokens = inputs
        return self.teacher_forced(features, tokens, training=training)

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(CaptionerConfig.from_dict(config.pop("config")), **config)
