"""The contracts between the stages, one module each, and the I/O they share (layer 0: imports no
other package of the project). docs/ARCHITECTURE.md lists the modules and what each defines."""
import os

# TensorFlow's C++ logs below errors hide the lines users need, in commands, notebooks and on
# Dataflow workers alike (every package imports this one first). A user's setting wins; so
# does CAPTIONER_VERBOSE=1 (caption_io.quiet).
if os.environ.get("CAPTIONER_VERBOSE") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
