"""Decoding's defaults, each set here once: the commands' flags, the export's serving_default,
model.decoding's keyword arguments and the client's signature inputs all take them from here
(caption_io/savedmodel.py names the inputs they go to).

  BEAM_SIZE        beams of a beam search (1: greedy)
  MAX_LENGTH       tokens, <end> included: the least a data directory's default length is, and
                   the length for an export whose export.json records none
  NUM_CAPTIONS     the best captions of the beam returned (1: the caption alone)
  NO_REPEAT_NGRAM  no n-gram of this many tokens twice in a caption (0: off)
  MIN_LENGTH       no <end> before this many tokens (0: off)
  LENGTH_ALPHA     beam search's length normalisation ((5 + n) / 6)^alpha (0: none)
"""
BEAM_SIZE = 3
MAX_LENGTH = 20
NUM_CAPTIONS = 1
NO_REPEAT_NGRAM = 0
MIN_LENGTH = 0
LENGTH_ALPHA = 0.7
