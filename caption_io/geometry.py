"""The geometry of the image features, shared by the encoder that makes them, the records
that store them, the model that attends over them and the plots that draw the attention.

InceptionV3 without its top takes a square INPUT_SIZE image and ends (mixed10) in a
GRID x GRID map of CHANNELS; the map is stored and attended over flattened, row-major:
POSITIONS weights a word, position p = row * GRID + column.
"""
INPUT_SIZE = 299
GRID = 8
POSITIONS = GRID * GRID
CHANNELS = 2048
FEATURE_SHAPE = (POSITIONS, CHANNELS)
