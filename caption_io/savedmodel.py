"""The exported SavedModel's contract: its signatures, their inputs and outputs, and the
file that records how it was made. caption_serving.export writes it; the client, the
`caption` command, evaluation and the benchmarks read it through these names.

  serving_default   images string[B] -> the outputs (the export's default beam size and length)
  caption_images    images string[B] + the options -> the outputs + the n-best outputs
  caption_features  features float32[B, POSITIONS, CHANNELS] + the options -> the same
Options, scalars (a signature cannot give an input a default, so each is always passed):
  beam_size int32 (1: greedy), max_length int32 (tokens, <end> included), num_captions int32
  (1..beam_size), no_repeat_ngram int32 (0: off), min_length int32 (0: off), length_alpha
  float32 (beam search's length normalisation ((5 + n) / 6)^alpha); their defaults are
  caption_io/decoding_defaults.py's.
Outputs, batch-major: captions string[B], tokens int32[B, T], scores float32[B],
attention float32[B, T, POSITIONS], lengths int32[B], token_text string[B, T]; n-best, best
first: nbest_captions string[B, K], nbest_tokens int32[B, K, T'], nbest_scores float32[B, K],
nbest_attention float32[B, K, T', POSITIONS], nbest_lengths int32[B, K] (0 marks an empty
place: fewer distinct captions than asked), nbest_token_text string[B, K, T'].
A caption is its tokens as written (caption_io.tokenizer: word pieces joined, no space between
CJK characters); token_text is each token as a reader sees it on its own ("" where the token is
not a word, vocab.is_word), so the words a plot labels line up with their attention rows.
Exports made before token_text existed lack it; their captions are words joined by spaces.
"""
import typing

from caption_io import decoding_defaults

SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES = "serving_default", "caption_images", "caption_features"
SIGNATURES = (SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES)
IMAGES, FEATURES, BEAM_SIZE, MAX_LENGTH = "images", "features", "beam_size", "max_length"
NUM_CAPTIONS, NO_REPEAT_NGRAM, MIN_LENGTH = "num_captions", "no_repeat_ngram", "min_length"
LENGTH_ALPHA = "length_alpha"
INT_OPTIONS = (BEAM_SIZE, MAX_LENGTH, NUM_CAPTIONS, NO_REPEAT_NGRAM, MIN_LENGTH)
OPTIONS = (*INT_OPTIONS, LENGTH_ALPHA)  # in the signatures' argument order, after images or features


class Outputs(typing.NamedTuple):
    """The output names of one family: the best caption (BEST) or the n best (NBEST). Its
    fields are named as model.decoded's records are, so `named` turns one into the other."""

    captions: str
    tokens: str
    scores: str
    attention: str
    lengths: str
    token_text: str

    def named(self, values: typing.Any, **given) -> dict:
        """{output name: value}: each field from `given`, else `values`' field of its name (a
        model.decoded.Hypotheses: tokens, scores, attention, lengths; the text is given)."""
        return {name: given[field] if field in given else getattr(values, field)
                for field, name in self._asdict().items()}


BEST = Outputs("captions", "tokens", "scores", "attention", "lengths", "token_text")
NBEST = Outputs(*(f"nbest_{name}" for name in BEST))
CAPTIONS, TOKENS, SCORES, ATTENTION, LENGTHS, TOKEN_TEXT = OUTPUTS = tuple(BEST)
NBEST_CAPTIONS, NBEST_TOKENS, NBEST_SCORES, NBEST_ATTENTION, NBEST_LENGTHS, NBEST_TOKEN_TEXT = NBEST_OUTPUTS = \
    tuple(NBEST)
# Beside the SavedModel: what the export wrote down about it (defaults, data, encoder, checkpoint).
EXPORT_INFO = "assets.extra/export.json"
# export.json's record of serving_default's decoding, the other signatures' defaults too.
INFO_BEAM_SIZE, INFO_MAX_LENGTH = "default_beam_size", "default_max_length"
# export.json's record of the image signatures' encoder precision (model/precision.py's Choice:
# precision, asked, why, speedup); an export without one encodes in float32.
INFO_ENCODER_PRECISION = "encoder_precision"
# TF Serving replays these PredictionLog records (a TFRecord file) when it loads the model,
# so the first real request does not pay for the graph's first run.
WARMUP_REQUESTS = "assets.extra/tf_serving_warmup_requests"


def default_max_length(max_tokens: int) -> int:
    """export.json's default_max_length for a data directory whose longest caption has
    `max_tokens` tokens: generated tokens, <end> included, with room to spare. The trainer's
    per-epoch captions use it too, so they are cut where the export's evaluation cuts them."""
    return max(max_tokens + 4, decoding_defaults.MAX_LENGTH)


def export_beam_size(info: dict) -> int:
    """The beam size an export decodes with by default (`info`: its export.json, {} when it has none)."""
    return int(info.get(INFO_BEAM_SIZE, decoding_defaults.BEAM_SIZE))


def export_max_length(info: dict) -> int:
    """The longest caption an export makes by default (`info`: its export.json, {} when it has none)."""
    return int(info.get(INFO_MAX_LENGTH, decoding_defaults.MAX_LENGTH))


def export_encoder_precision(info: dict) -> str:
    """The precision an export's image signatures encode in (`info`: its export.json, {} when it has none)."""
    return (info.get(INFO_ENCODER_PRECISION) or {}).get("precision", "float32")
