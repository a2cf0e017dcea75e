"""TF Serving's batching parameters for an export, written beside it by the export:
EXPORT/assets.extra/batching_parameters.txt, a BatchingParameters message in protobuf's text
format, the file `tensorflow_model_server --enable_batching --batching_parameters_file=FILE` reads.

Without batching TF Serving runs each request as its own model call, several at once; on a CPU
those only share the cores. The values are measured for this model on a CPU (benchmarks.serve_load
--sweep: serving_default's images per CPU-second at batches of 1 to 16, one call at a time and
two at once; docs/benchmarks.md has the figures, the machine and the export):
  - max_batch_size 4: the smallest batch within 3% of the best images per CPU-second (batch 8);
    batch 1 does 15% fewer images a CPU-second, and batch 4's calls take half batch 8's time;
  - num_batch_threads 1: one model call at a time; a second at once did no more images a
    CPU-second (on a dedicated machine, compare the sweep's images/s of one call and two);
  - batch_timeout_micros 0: a batch is what is queued when the thread is free, as caption-serve
    batches (caption_serving/batcher.py). Under load the queue fills while the last batch runs,
    so waiting for more would add latency and no images;
  - max_enqueued_batches 98: the batches one thread clears in 60 s (caption-serve's --timeout)
    at 0.61 s a batch of 4; TF Serving refuses a request beyond them (UNAVAILABLE) rather than
    answer after its client has given up.
On another machine measure again and edit the file: it is text.

TF Serving batches every signature once --enable_batching is on, and then refuses a request
with a scalar input ("Batching session Run() input tensors must have at least one dimension"):
caption_images and caption_features take their options as scalars, so a server with this file
answers serving_default only; serve the option signatures from one without it.
"""
from __future__ import annotations

import dataclasses
import functools

FILE = "assets.extra/batching_parameters.txt"


@dataclasses.dataclass(frozen=True)
class Batching:
    """BatchingParameters' fields this project sets (tensorflow_serving's session_bundle_config.proto)."""

    max_batch_size: int = 4
    batch_timeout_micros: int = 0
    num_batch_threads: int = 1
    max_enqueued_batches: int = 98


MEASURED = Batching()


def text(batching: Batching = MEASURED) -> str:
    """The parameters in protobuf text format; each is an Int64Value, hence `{ value: N }`."""
    return "".join(f"{name} {{ value: {value} }}\n" for name, value in dataclasses.asdict(batching).items())


def write(export_dir: str, batching: Batching = MEASURED) -> str:
    """Write the file into an export directory (local or gs://); -> its path."""
    import tensorflow as tf

    path = f"{export_dir.rstrip('/')}/{FILE}"
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text(batching))
    return path


@functools.cache
def message_class():
    """tensorflow.serving.BatchingParameters as a Python message class. tensorflow-serving-api
    does not ship session_bundle_config.proto's module, so where it is missing the message is
    declared here with the proto's field names, numbers and types: a file that parses with it
    parses in TF Serving."""
    try:
        from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2
        return session_bundle_config_pb2.BatchingParameters
    except ImportError:
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    proto = descriptor_pb2.FileDescriptorProto(name="caption_serving/batching_parameters.proto", syntax="proto3",
                                               package="tensorflow.serving",
                                               dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                                   "num_batch_threads"), start=1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                          type_name=".google.protobuf.Int64Value")
    message.field.add(name="thread_pool_name", number=5, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                      type_name=".google.protobuf.StringValue")
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: no clash with a module that declares it too
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def parse(content: str):
    """A batching parameters file's text -> the BatchingParameters message, as TF Serving parses
    it (text_format.ParseError on a field it does not have or a value of the wrong type)."""
    from google.protobuf import text_format

    return text_format.Parse(content, message_class()())


def read(export_dir: str) -> Batching:
    """The parameters an export's file holds."""
    import tensorflow as tf

    with tf.io.gfile.GFile(f"{export_dir.rstrip('/')}/{FILE}") as f:
        message = parse(f.read())
    return Batching(**{f.name: getattr(message, f.name).value for f in dataclasses.fields(Batching)})
