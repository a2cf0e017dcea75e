"""caption-serve's gRPC API, driven by TF Serving's own client (tensorflow_serving.apis' stubs):
the same captions as the REST API and the project's client, the export's signature defs as
metadata (over gRPC and REST), TF Serving's status codes for each error, eight concurrent
clients; and TF Serving's batching parameters file, and rest.rows_of's n-best."""
from __future__ import annotations

import io
import json
import os
import threading

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format, text_format
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from caption_io import savedmodel, vocab
from caption_serving import batching_config, client, predict, rest, serve
from tests.conftest import exit_code, in_threads
from tests.test_serve import STATUS, LiveServer, columnar, same_rows

PREDICT = "/v1/models/captioner:predict"
Code = grpc.StatusCode


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(trained_job):
    return os.path.join(trained_job, "export")


@pytest.fixture(scope="module")
def served(export_dir):
    loaded, info = client.load_model(export_dir)
    return predict.Served(loaded, info, path=export_dir)


@pytest.fixture(scope="module")
def blobs(scene_dir):
    """Eight scene images: a different one for each concurrent client."""
    folder = os.path.join(scene_dir, "train2014")
    return [open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))[:8]]


class Both:
    """One app serving REST and gRPC on loopback (gRPC on a port of its own choosing)."""

    def __init__(self, served, limits: predict.Limits | None = None):
        self.server = LiveServer(serve.make_app(served, limits or predict.Limits(), ("127.0.0.1", 0)))
        self.state = self.server.app.state
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.state.grpc_port}")
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def both(served):
    server = Both(served)
    yield server
    server.close()


def predict_request(images, signature="", name="captioner", **scalars) -> predict_pb2.PredictRequest:
    """A PredictRequest as a TF Serving client writes one: the image files' bytes as a string tensor."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    for key, value in scalars.items():
        dtype = tf.float32 if key == savedmodel.LENGTH_ALPHA else tf.int32
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return request


def options(beam_size, max_length) -> dict:
    return dict(client.CONTROL_DEFAULTS, beam_size=beam_size, max_length=max_length)


def numpy_outputs(response) -> dict:
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def refused(call, request, timeout=60) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=timeout)
    return e.value.code(), e.value.details()


# ------------------------------------------------------------------------------- Predict
def test_tf_servings_stub_gets_the_captions_of_the_rest_api_and_the_client(both, served, blobs):
    beam, length = savedmodel.export_beam_size(served.info), savedmodel.export_max_length(served.info)
    pair = blobs[:2]
    response = both.predictions.Predict(predict_request(pair, "caption_images", **options(beam, 12)), timeout=120)
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == ("captioner", 1, "caption_images")
    out = numpy_outputs(response)
    assert set(out) == set(savedmodel.OUTPUTS) | set(savedmodel.NBEST_OUTPUTS)
    # Values in their typed fields, as TF Serving writes them (clients read float_val and the like).
    scores, tokens = response.outputs["scores"], response.outputs["tokens"]
    assert not scores.tensor_content and list(scores.float_val) == out["scores"].tolist()
    assert list(tokens.int_val) == out["tokens"].reshape(-1).tolist()
    # The REST API's answer to the same request, tensor for tensor.
    answer = httpx.post(both.server.url + PREDICT, json=columnar(pair, beam, 12), timeout=120).json()
    assert json.loads(rest.dumps(rest.response("columnar", out))) == answer
    mine = client.caption_batch(served.loaded, pair, beam, 12)
    same_rows(client.rows(out), mine)
    same_rows(client.rows(out)[0]["nbest"], mine[0]["nbest"])
    # serving_default (an empty signature_name, as TF Serving reads it): the export's defaults.
    default = numpy_outputs(both.predictions.Predict(predict_request(pair), timeout=120))
    assert set(default) == set(savedmodel.OUTPUTS)
    same_rows(client.rows(default), client.caption_batch(served.loaded, pair, beam, length))
    # output_filter: only the outputs asked for.
    request = predict_request(pair[:1])
    request.output_filter.extend(["scores", "captions"])
    assert set(both.predictions.Predict(request, timeout=120).outputs) == {"scores", "captions"}


def test_metadata_is_the_exports_signature_defs_over_grpc_and_rest(both, served, export_dir):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "captioner"
    response = both.predictions.GetModelMetadata(request, timeout=60)
    assert (response.model_spec.name, response.model_spec.version.value) == ("captioner", 1)
    defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(defs)
    # What saved_model_cli reads from the export, proto for proto (TF's own reader, not the server's).
    from tensorflow.python.tools import saved_model_utils

    assert dict(defs.signature_def) == dict(saved_model_utils.get_meta_graph_def(export_dir, "serve").signature_def)
    # And the signatures the loaded export calls: their inputs' and outputs' names, dtypes and shapes.
    loaded = served.loaded  # tf.saved_model.load's
    assert set(loaded.signatures) == set(savedmodel.SIGNATURES) <= set(defs.signature_def)
    for name, fn in loaded.signatures.items():
        sig = defs.signature_def[name]
        assert sig.method_name == "tensorflow/serving/predict"
        for infos, specs in ((sig.inputs, fn.structured_input_signature[1]), (sig.outputs, fn.structured_outputs)):
            assert set(infos) == set(specs), name
            for key, spec in specs.items():
                if not isinstance(spec, tf.TensorSpec):  # a ragged output is a composite tensor there too
                    assert infos[key].WhichOneof("encoding") == "composite_tensor", (name, key)
                    continue
                assert infos[key].dtype == spec.dtype.as_datatype_enum, (name, key)
                assert tf.TensorShape(infos[key].tensor_shape).as_list() == spec.shape.as_list(), (name, key)
    # REST: the same answer as TF Serving's REST API writes it (protobuf JSON, names kept, defaults written).
    for path in ("/v1/models/captioner/metadata", "/v1/models/captioner/versions/1/metadata"):
        r = httpx.get(both.server.url + path)
        assert r.status_code == 200, r.text
        assert r.json()["model_spec"] == {"name": "captioner", "signature_name": "", "version": "1"}
        assert r.json()["metadata"]["signature_def"] == json_format.MessageToDict(
            defs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    images = r.json()["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_STRING" and images["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}],
                                                                         "unknown_rank": False}
    assert httpx.get(both.server.url + "/v1/models/other/metadata").status_code == 404
    # GetModelStatus: what the REST status route answers, as protobuf JSON.
    status = both.models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "captioner"}))
    assert json_format.MessageToDict(status, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True) == STATUS


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_each_error_has_tf_servings_status_code(both, served, blobs):
    good, scalars = blobs[0], options(1, 8)
    cases = [
        (predict_request([good], name="other"), Code.NOT_FOUND, "Servable not found for request: Latest(other)"),
        (predict_request([good], "nope"), Code.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        (predict_request([good], "caption_images"), Code.INVALID_ARGUMENT, "Missing but required: {beam_size,"),
        (predict_request([good], "serving_default", beam_size=3), Code.INVALID_ARGUMENT, "Sent extra: {beam_size}"),
        (predict_request([good, b"<html>not a picture</html>"]), Code.INVALID_ARGUMENT,
         "images[1]: not an image (unrecognised format)"),
        (predict_request(good), Code.INVALID_ARGUMENT, "images: shape [], the signature wants [?]"),
        (predict_request([], "caption_images", **scalars), Code.INVALID_ARGUMENT, "no images in the request"),
        (predict_request([good], "caption_images", **dict(scalars, beam_size=0)), Code.INVALID_ARGUMENT,
         "beam_size must be at least 1"),
        # Refused by the model itself: TensorFlow's InvalidArgumentError keeps its code.
        (predict_request([good], "caption_images", **dict(scalars, num_captions=3)), Code.INVALID_ARGUMENT,
         "num_captions must be <= beam_size"),
    ]
    versioned, labelled, floats, filtered = (predict_request([good]) for _ in range(4))
    versioned.model_spec.version.value = 2
    labelled.model_spec.version_label = "stable"
    floats.inputs["images"].CopyFrom(tf.make_tensor_proto([1.0]))
    filtered.output_filter.append("nope")
    cases += [(versioned, Code.NOT_FOUND, "Specific(captioner, 2)"),
              (labelled, Code.INVALID_ARGUMENT, "Unrecognized servable version label: stable"),
              (floats, Code.INVALID_ARGUMENT, "Expects images to be string but float32 is provided"),
              (filtered, Code.INVALID_ARGUMENT, "output tensor alias not found in signature: nope")]
    for request, code, words in cases:
        got, details = refused(both.predictions.Predict, request)
        assert got == code and words in details, (got, details, words)
    # The client's own deadline (none of the request's work is left running for it).
    assert refused(both.predictions.Predict, predict_request([good]), timeout=0.05)[0] == Code.DEADLINE_EXCEEDED
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "captioner"})
    assert refused(both.predictions.GetModelMetadata, metadata) == (
        Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    metadata.metadata_field.append("nope")
    assert refused(both.predictions.GetModelMetadata, metadata)[0] == Code.INVALID_ARGUMENT
    status = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "other"})
    assert refused(both.models.GetModelStatus, status) == (Code.NOT_FOUND, "Could not find any versions of model other")
    classify = classification_pb2.ClassificationRequest(model_spec={"name": "captioner"})
    assert refused(both.predictions.Classify, classify)[0] == Code.UNIMPLEMENTED


def test_the_limits_are_resource_exhausted_and_deadline_exceeded(served, blobs):
    strict = Both(served, predict.Limits(max_body_bytes=50_000, max_pixels=1000, timeout=0.001))
    try:
        too_big = refused(strict.predictions.Predict, predict_request([bytes(60_000)]))
        too_many_pixels = refused(strict.predictions.Predict, predict_request([blobs[0]]))
        too_slow = refused(strict.predictions.Predict, predict_request([_png((20, 20))]))
    finally:
        strict.close()
    assert too_big[0] == Code.RESOURCE_EXHAUSTED and "larger than max" in too_big[1].lower(), too_big
    assert too_many_pixels[0] == Code.RESOURCE_EXHAUSTED and "image too large" in too_many_pixels[1]
    assert too_slow == (Code.DEADLINE_EXCEEDED, "no answer within 0.001 s (--timeout)")


def test_eight_concurrent_grpc_clients_get_their_own_answers(both, served, blobs):
    beam, length = savedmodel.export_beam_size(served.info), savedmodel.export_max_length(served.info)
    results, barrier = {}, threading.Barrier(8)

    def one_client(c):
        with grpc.insecure_channel(f"127.0.0.1:{both.state.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            # Two settings: serving_default's, and greedy through caption_images; those never share a call.
            request = predict_request([blobs[c]]) if c % 2 else \
                predict_request([blobs[c]], "caption_images", **options(1, length))
            barrier.wait()
            results[c] = numpy_outputs(stub.Predict(request, timeout=120))

    calls, merged = both.state.batcher.calls, both.state.batcher.merged
    errors = in_threads(one_client, 8)
    assert not errors, errors
    for c, out in results.items():
        want = client.caption_batch(served.loaded, [blobs[c]], beam if c % 2 else 1, length)
        same_rows(client.rows(out), want)
        assert out["tokens"].shape[1] == out["lengths"].max()  # its own length, not its batch's
    assert both.state.batcher.merged > merged and both.state.batcher.calls - calls < 8


# --------------------------------------------------------------------------- the command
def test_a_grpc_port_in_use_is_one_error_line(tmp_path, capsys, clean_logging):
    taken = serve.listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert exit_code(serve.main, ["--model", str(tmp_path), "--port", "0", "--grpc-port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port} ("), err


# ------------------------------------------------------------------ TF Serving's batching file
def test_the_export_writes_tf_servings_batching_parameters(export_dir):
    path = os.path.join(export_dir, batching_config.FILE)
    with open(path) as f:
        content = f.read()
    message = batching_config.parse(content)  # as TF Serving's BatchingParameters, field by field
    assert message.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    assert text_format.MessageToString(message) == text_format.MessageToString(batching_config.parse(
        batching_config.text()))
    assert batching_config.read(export_dir) == batching_config.MEASURED
    assert message.max_batch_size.value >= 1 and message.num_batch_threads.value >= 1
    for wrong in ("max_batch_size: 8", "batch_size { value: 8 }", 'max_batch_size { value: "8" }'):
        with pytest.raises(text_format.ParseError):
            batching_config.parse(wrong)


# ---------------------------------------------------------------------------- rows_of's n-best
def test_rows_of_reads_the_n_best_in_both_formats():
    w = vocab.FIRST_WORD_ID
    rng = np.random.default_rng(0)
    out = {"captions": np.array([b"red square", b"blue"], dtype=object),
           "tokens": np.array([[w, w + 1, 2], [w + 2, 2, 0]], np.int32), "scores": np.array([-1.5, -0.5], np.float32),
           "attention": rng.random((2, 3, 4), dtype=np.float32), "lengths": np.array([3, 2], np.int32),
           "token_text": np.array([[b"red", b"square", b""], [b"blue", b"", b""]], dtype=object),
           "nbest_captions": np.array([[b"red square", b"red"], [b"blue", b""]], dtype=object),
           "nbest_tokens": np.array([[[w, w + 1, 2], [w, 2, 0]], [[w + 2, 2, 0], [0, 0, 0]]], np.int32),
           "nbest_scores": np.array([[-1.5, -2.0], [-0.5, 0.0]], np.float32),
           "nbest_attention": rng.random((2, 2, 3, 4), dtype=np.float32),
           "nbest_lengths": np.array([[3, 2], [2, 0]], np.int32),  # 0: an empty place, left out
           "nbest_token_text": np.array([[[b"red", b"square", b""], [b"red", b"", b""]],
                                         [[b"blue", b"", b""], [b"", b"", b""]]], dtype=object)}
    want = client.rows(out)
    assert [len(row["nbest"]) for row in want] == [2, 1]
    for fmt in ("row", "columnar"):
        got = rest.rows_of(json.loads(rest.dumps(rest.response(fmt, out))))
        same_rows(got, want)
        for g, w_ in zip(got, want):
            same_rows(g["nbest"], w_["nbest"])
    best_only = {k: v for k, v in out.items() if not k.startswith("nbest_")}
    assert "nbest" not in rest.rows_of(json.loads(rest.dumps(rest.response("row", best_only))))[0]
