"""The exported SavedModel's contract: its signatures, their inputs and outputs, and the
file that records how it was made. caption_serving.export writes it; the client, the
`caption` command, evaluation and the benchmarks read it through these names.

  serving_default   images string[B] -> the outputs (the export's default beam size)
  caption_images    images string[B], beam_size int32[], max_length int32[] -> the outputs
  caption_features  features float32[B, POSITIONS, CHANNELS], beam_size, max_length -> the outputs
Outputs, batch-major: captions string[B], tokens int32[B, T], scores float32[B],
attention float32[B, T, POSITIONS], lengths int32[B].
"""
SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES = "serving_default", "caption_images", "caption_features"
SIGNATURES = (SERVING_DEFAULT, CAPTION_IMAGES, CAPTION_FEATURES)
IMAGES, FEATURES, BEAM_SIZE, MAX_LENGTH = "images", "features", "beam_size", "max_length"
CAPTIONS, TOKENS, SCORES, ATTENTION, LENGTHS = "captions", "tokens", "scores", "attention", "lengths"
OUTPUTS = (CAPTIONS, TOKENS, SCORES, ATTENTION, LENGTHS)
# Beside the SavedModel: what the export wrote down about it (defaults, data, encoder, checkpoint).
EXPORT_INFO = "assets.extra/export.json"
# TF Serving replays these PredictionLog records (a TFRecord file) when it loads the model,
# so the first real request does not pay for the graph's first run.
WARMUP_REQUESTS = "assets.extra/tf_serving_warmup_requests"
