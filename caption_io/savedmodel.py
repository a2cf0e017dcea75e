"""The exported SavedModel's contract: its signatures, their inputs and outputs, and the
file that records how it was made. caption_serving.export writes it; the client, the
`caption` command, evaluation and the benchmarks read it through these names.

  serving_default   images string[B] -> the outputs (the export's default beam size and length)
  caption_images    images string[B] + the options -> the outputs + the n-best outputs
  caption_features  features float32[B, POSITIONS, CHANNELS] + the options -> the same
Options, scalars (a signature cannot give an input a default, so each is always passed):
  beam_size int32 (1: greedy), max_length int32 (tokens, <end> included), num_captions int32
  (1..beam_size), no_repeat_ngram int32 (0: off), min_length int32 (0: off), length_alpha
  float32 (beam search's length normalisation ((5 + n) / 6)^alpha; decoding's default 0.7).
Outputs, batch-major: captions string[B], tokens int32[B, T], scores float32[B],
attention float32[B, T, POSITIONS], lengths int32[B]; n-best, best first: nbest_captions
string[B, K], nbest_tokens int32[B, K, T'], nbest_scores float32[B, K], nbest_attention
float32[B, K, T', POSITIONS], nbest_lengths int32[B, K] (0 marks an empty place: fewer
distinct captions than asked).
"""
SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES = "serving_default", "caption_images", "caption_features"
SIGNATURES = (SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES)
IMAGES, FEATURES, BEAM_SIZE, MAX_LENGTH = "images", "features", "beam_size", "max_length"
NUM_CAPTIONS, NO_REPEAT_NGRAM, MIN_LENGTH = "num_captions", "no_repeat_ngram", "min_length"
LENGTH_ALPHA = "length_alpha"
INT_OPTIONS = (BEAM_SIZE, MAX_LENGTH, NUM_CAPTIONS, NO_REPEAT_NGRAM, MIN_LENGTH)
OPTIONS = (*INT_OPTIONS, LENGTH_ALPHA)  # in the signatures' argument order, after images or features
CAPTIONS, TOKENS, SCORES, ATTENTION, LENGTHS = "captions", "tokens", "scores", "attention", "lengths"
OUTPUTS = (CAPTIONS, TOKENS, SCORES, ATTENTION, LENGTHS)
NBEST_CAPTIONS, NBEST_TOKENS, NBEST_SCORES = "nbest_captions", "nbest_tokens", "nbest_scores"
NBEST_ATTENTION, NBEST_LENGTHS = "nbest_attention", "nbest_lengths"
NBEST_OUTPUTS = (NBEST_CAPTIONS, NBEST_TOKENS, NBEST_SCORES, NBEST_ATTENTION, NBEST_LENGTHS)
# Beside the SavedModel: what the export wrote down about it (defaults, data, encoder, checkpoint).
EXPORT_INFO = "assets.extra/export.json"
# TF Serving replays these PredictionLog records (a TFRecord file) when it loads the model,
# so the first real request does not pay for the graph's first run.
WARMUP_REQUESTS = "assets.extra/tf_serving_warmup_requests"


def default_max_length(max_tokens: int) -> int:
    """export.json's default_max_length for a data directory whose longest caption has
    `max_tokens` tokens: generated tokens, <end> included, with room to spare. The trainer's
    per-epoch captions use it too, so they are cut where the export's evaluation cuts them."""
    return max(max_tokens + 4, 20)
