"""The captioner's hyper-parameters: one object, saved next to every checkpoint.

A checkpoint holds variables, not shapes; `CaptionerConfig.to_json()` is written beside it so
that `Captioner(CaptionerConfig.from_json(...))` always rebuilds the model the weights came from.
"""
import dataclasses
import json

from caption_io import geometry

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    vocab_size: int                 # from the data dir's vocab.txt (id 0 = <pad>)
    embedding_dim: int = 256        # encoded-feature width (and the GRU's word embedding)
    units: int = 512                # the decoder's width: GRU state and attention; Transformer d
    decoder: str = "gru"            # the decoder family (model/decoders.py): gru | transformer
    layers: int = 2                 # transformer: decoder blocks
    heads: int = 2                  # transformer: attention heads (units a multiple of it)
    ff_units: int = 0               # transformer: feed-forward width (0: 2 * units)
    num_positions: int = geometry.DEFAULT.positions  # the encoder's grid, flattened (its data's metadata.json)
    feature_dim: int = geometry.DEFAULT.channels     # channels of the stored features
    dropout: float = 0.1            # GRU: on word embeddings and its output; transformer: on
                                    # its input and every sub-layer's output
    word_dropout: float = 0.0       # training: a fed word -> <unk> with this probability
    attention_reg: float = 1.0      # lambda of the doubly stochastic regulariser; 0 = off
    gate: bool = False              # the paper's beta_t = sigmoid(f_beta(h_{t-1})) context gate
    compute_dtype: str = "float32"  # or "bfloat16" (variables and logits stay float32)

    def __post_init__(self):
        from model import decoders  # its families import this module
        for name in ("vocab_size", "embedding_dim", "units", "num_positions", "feature_dim", "layers",
                     "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CaptionerConfig.{name} must be a positive int, got {value!r}")
        if self.decoder not in decoders.NAMES:
            raise ValueError(f"CaptionerConfig.decoder must be one of {decoders.NAMES}, got {self.decoder!r}")
        if isinstance(self.ff_units, bool) or not isinstance(self.ff_units, int) or self.ff_units < 0:
            raise ValueError(f"CaptionerConfig.ff_units must be an int >= 0, got {self.ff_units!r}")
        if self.ff_units == 0:  # spelled out, so a saved config says what was built
            object.__setattr__(self, "ff_units", 2 * self.units)
        if self.decoder == "transformer" and self.units % self.heads:
            raise ValueError(f"CaptionerConfig.units ({self.units}) must be a multiple of heads ({self.heads}) "
                             "for the transformer decoder")
        if self.vocab_size < 5:
            raise ValueError(f"CaptionerConfig.vocab_size must be >= 5 (<pad>, <unk>, <start>, "
                             f"<end> and a word), got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CaptionerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"CaptionerConfig.word_dropout must be in [0, 1), got {self.word_dropout!r}")
        if self.attention_reg < 0:
            raise ValueError(f"CaptionerConfig.attention_reg must be >= 0, "
                             f"got {self.attention_reg!r}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"CaptionerConfig.compute_dtype must be one of {_DTYPES}, "
                             f"got {self.compute_dtype!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CaptionerConfig: unknown key(s) {unknown}; "
                             f"known keys are {sorted(known)}")
        if "vocab_size" not in d:
            raise ValueError("CaptionerConfig: missing required key 'vocab_size'")
        return cls(**d)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
