"""The contracts between the stages, and the I/O they share (layer 0: imports no other
package of the project). Each contract lives in one module: records (the TFRecord format),
metadata (metadata.json), vocab, geometry (the feature maps), datadir (a data directory's
layout), jobdir (a job's layout), savedmodel (the export's signatures), decoding_defaults
(decoding's default settings), scenes (the generated scene set's words), cli (what every
command shares at its edge: flags, the error line and exit code, logging) and quiet (a
command's start without TensorFlow's start-up lines)."""
import os

# TensorFlow's C++ logs below errors hide the lines users need, in commands, notebooks and on
# Dataflow workers alike (every package imports this one first). A user's setting wins; so
# does CAPTIONER_VERBOSE=1 (caption_io.quiet).
if os.environ.get("CAPTIONER_VERBOSE") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
