"""The contracts between the stages, and the I/O they share (layer 0: imports no other
package of the project). Each contract lives in one module: records (the TFRecord format),
metadata (metadata.json), vocab, geometry (the feature maps), jobdir (a job's layout),
savedmodel (the export's signatures), errors (a command's error line and exit code)."""
import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU flags) hides the lines
# users need; real warnings and errors still show. A user's setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
