"""TF Serving's warm-up requests for an export (caption_io/savedmodel.py: WARMUP_REQUESTS).

TF Serving reads assets.extra/tf_serving_warmup_requests when it loads a model version
and runs each PredictionLog in it before the version is AVAILABLE, so the first caller
does not wait for the first run's one-time work (graph optimisation, oneDNN primitives
for each batch shape, memory pools). Vertex AI's prebuilt TensorFlow containers run
TF Serving and read the same file. The records are built with tensorflow-serving-api's
protos, the ones the server parses.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from caption_io import savedmodel

# Batch shapes a server meets first: one image, and a client's small batch.
BATCH_SIZES = (1, 8)


def sample_jpeg(seed: int = 0, size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-sized JPEG (smooth colour fields and noise): what the decode, resize and
    encoder see on a real request, made here since an export ships no images."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def requests(model_name: str = "captioner", batch_sizes=BATCH_SIZES) -> list:
    """PredictionLog records, one per batch size, each a serving_default request."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    image = sample_jpeg()
    logs = []
    for n in batch_sizes:
        request = predict_pb2.PredictRequest()
        # TF Serving warms the version it is loading whatever name the record gives.
        request.model_spec.name = model_name
        request.model_spec.signature_name = savedmodel.SERVING_DEFAULT
        request.inputs[savedmodel.IMAGES].CopyFrom(tf.make_tensor_proto([image] * n, dtype=tf.string))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write(export_dir: str) -> str:
    """Write the warm-up file into an export directory (local or gs://); -> its path."""
    import tensorflow as tf

    path = f"{export_dir.rstrip('/')}/{savedmodel.WARMUP_REQUESTS}"
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.TFRecordWriter(path) as w:
        for log in requests():
            w.write(log.SerializeToString())
    return path


def read(export_dir: str) -> list:
    """The warm-up file's PredictionLog records, parsed as TF Serving parses them."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = f"{export_dir.rstrip('/')}/{savedmodel.WARMUP_REQUESTS}"
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
