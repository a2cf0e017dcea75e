"""Training, export, evaluation and captioning."""
import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU flags) hides the lines
# users need; real warnings and errors still show. A user's setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
