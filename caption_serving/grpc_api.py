"""TF Serving's gRPC API for caption-serve: PredictionService's Predict and GetModelMetadata,
ModelService's GetModelStatus, so that a client written with tensorflow-serving-api's stubs
(port 8500) runs against caption-serve and TF Serving alike.

Production clients of TF Serving mostly call it over gRPC: an image travels as the bytes of a
string tensor, with no base64 or JSON. The server runs on the REST app's event loop (grpc.aio)
and submits to the same batcher, so requests of both APIs share model calls, limits and the
checks of their images (predict.checked_inputs), and get the same captions for the same image.

What TF Serving answers, and so what this answers (its status codes are TensorFlow's):
  - a model_spec naming another model, or a version other than 1: NOT_FOUND; a version label:
    INVALID_ARGUMENT (this server defines none); no model_spec: INVALID_ARGUMENT;
  - an empty signature_name is serving_default; an unknown one is FAILED_PRECONDITION;
  - inputs other than the signature's, a tensor of another dtype or shape, an image that is not
    one, an unknown output in output_filter: INVALID_ARGUMENT;
  - a message over --max-body-bytes: RESOURCE_EXHAUSTED (gRPC's own receive limit), and here an
    image over --max-pixels too; no answer within --timeout or the client's deadline:
    DEADLINE_EXCEEDED; a failed model call: its TensorFlow error's code.
Outputs are trimmed as the REST API trims them (predict.trimmed), and written as TF Serving
writes them, each value in its typed field (float_val, int_val, string_val), not packed in
tensor_content: client code that reads response.outputs["scores"].float_val works on both.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time

import grpc
import numpy as np
from grpc import aio
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from caption_io import savedmodel
from caption_serving import predict, rest

log = logging.getLogger(__name__)

SIGNATURE_DEF = "signature_def"  # the one metadata field TF Serving has
Code = grpc.StatusCode
# The shared checks' HTTP statuses, as gRPC codes (TF Serving's REST API maps them the other way).
_BY_STATUS = {400: Code.INVALID_ARGUMENT, 404: Code.NOT_FOUND, 413: Code.RESOURCE_EXHAUSTED,
              504: Code.DEADLINE_EXCEEDED}
_BY_NUMBER = {c.value[0]: c for c in Code}  # TensorFlow's error codes are gRPC's numbers


class Refused(Exception):
    """A request refused with a gRPC status `code`; str() is the message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def refusal(e: rest.RestError) -> Refused:
    """A RestError of the shared checks or of the model call, as gRPC's status."""
    import tensorflow as tf

    if isinstance(e.__cause__, tf.errors.OpError):  # the model's own error: its code, as TF Serving passes it on
        return Refused(_BY_NUMBER.get(e.__cause__.error_code, Code.UNKNOWN), str(e))
    if isinstance(e, rest.OverLimit):
        return Refused(Code.RESOURCE_EXHAUSTED, str(e))
    return Refused(_BY_STATUS.get(e.status, Code.INTERNAL), str(e))


def check_model_spec(request, served: predict.Served, status: bool = False) -> None:
    """Refuse a request whose model_spec is not the served model's version 1. GetModelStatus
    (`status`) words it as TF Serving does, and, as there, ignores a version label."""
    if not request.HasField("model_spec"):
        raise Refused(Code.INVALID_ARGUMENT, "Missing ModelSpec")
    spec = request.model_spec
    if spec.WhichOneof("version_choice") == "version_label" and not status:
        raise Refused(Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}")
    version = spec.version.value if spec.HasField("version") else None
    if spec.name == served.name and version in (None, int(predict.VERSION)):
        return
    if status:
        raise Refused(Code.NOT_FOUND, f"Could not find version {version} of model {spec.name}" if version is not None
                      else f"Could not find any versions of model {spec.name}")
    which = f"Specific({spec.name}, {version})" if version is not None else f"Latest({spec.name})"
    raise Refused(Code.NOT_FOUND, f"Servable not found for request: {which}")


# ------------------------------------------------------------------------------- Predict
def request_inputs(request, specs: dict[str, rest.Spec]) -> dict[str, np.ndarray]:
    """A PredictRequest's input tensors -> numpy, each checked against the signature's spec."""
    import tensorflow as tf

    sent, wanted = set(request.inputs), set(specs)
    if sent != wanted:
        def names(s):
            return "{" + ",".join(sorted(s)) + "}"

        raise Refused(Code.INVALID_ARGUMENT, f"input size does not match signature: {len(sent)}!={len(wanted)} "
                      f"len({names(sent)}) != len({names(wanted)}). Sent extra: {names(sent - wanted)}. "
                      f"Missing but required: {names(wanted - sent)}.")
    inputs = {}
    for name, spec in specs.items():
        proto = request.inputs[name]
        try:
            dtype = tf.dtypes.as_dtype(proto.dtype).name
            array = tf.make_ndarray(proto)
        except (TypeError, ValueError) as e:
            raise Refused(Code.INVALID_ARGUMENT, f"{name}: not a tensor TensorFlow can read ({e})") from None
        if dtype != spec.dtype:
            raise Refused(Code.INVALID_ARGUMENT, f"Expects {name} to be {spec.dtype} but {dtype} is provided")
        rest.check_shape(array.shape, spec, name)
        inputs[name] = array
    return inputs


def output_names(request, served: predict.Served, signature: str) -> list[str]:
    """The outputs a request asks for (its output_filter; none: all), checked as TF Serving checks them."""
    outputs = sorted(served.loaded.signatures[signature].structured_outputs)
    for i, alias in enumerate(request.output_filter):
        if alias not in outputs:
            raise Refused(Code.INVALID_ARGUMENT, f"output tensor alias not found in signature: {alias} "
                          f"Outputs expected to be in the set {{{','.join(outputs)}}}.")
        if alias in request.output_filter[:i]:
            raise Refused(Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
    return list(request.output_filter) or outputs


def parse_predict(request, served: predict.Served, limits: predict.Limits) -> tuple[str, dict, list[str]]:
    """A PredictRequest -> (signature, checked inputs, the outputs to answer with), or Refused.
    Its images are decoded here, in a worker thread, as the REST API decodes a body's."""
    check_model_spec(request, served)
    signature = request.model_spec.signature_name or savedmodel.SERVING_DEFAULT
    if signature not in served.specs:
        raise Refused(Code.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
    outputs = output_names(request, served, signature)
    try:
        return signature, predict.checked_inputs(request_inputs(request, served.specs[signature]), limits), outputs
    except rest.RestError as e:
        raise refusal(e) from None


def predict_response(served: predict.Served, signature: str, out: dict[str, np.ndarray], names: list[str]):
    """Outputs -> TF Serving's PredictResponse (its model_spec names the version that answered)."""
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    _answering_spec(response.model_spec, served, signature)
    for name in names:
        response.outputs[name].CopyFrom(tensor_proto(out[name]))
    return response


_TYPED_FIELDS = {"float32": "float_val", "float64": "double_val", "int32": "int_val", "int64": "int64_val",
                 "bool": "bool_val"}


def tensor_proto(array: np.ndarray):
    """A TensorProto with the values in their typed field, as TF Serving's Predict answers
    (Tensor::AsProtoField); tf.make_tensor_proto packs numbers in tensor_content."""
    import tensorflow as tf

    proto = tf.make_tensor_proto(array)
    if proto.tensor_content:
        proto.ClearField("tensor_content")
        getattr(proto, _TYPED_FIELDS[array.dtype.name]).extend(array.reshape(-1).tolist())
    return proto


def _answering_spec(spec, served: predict.Served, signature: str = "") -> None:
    spec.name, spec.signature_name = served.name, signature
    spec.version.value = int(predict.VERSION)


# ------------------------------------------------------------------------------ metadata
@functools.lru_cache(maxsize=8)
def read_signature_defs(export_dir: str):
    """The export's SignatureDefMap: its serving meta graph's signature defs, read from
    saved_model.pb as TF Serving reads them (the __saved_model_init_op entry included)."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    saved, path = saved_model_pb2.SavedModel(), f"{export_dir.rstrip('/')}/saved_model.pb"
    if tf.io.gfile.exists(path):
        saved.ParseFromString(tf.io.gfile.GFile(path, "rb").read())
    else:
        text_format.Parse(tf.io.gfile.GFile(path + "txt").read(), saved)
    graph = next((g for g in saved.meta_graphs if tf.saved_model.SERVING in g.meta_info_def.tags), None)
    if graph is None:
        raise rest.RestError(f"{export_dir}: no meta graph tagged {tf.saved_model.SERVING!r}", 500)
    return get_model_metadata_pb2.SignatureDefMap(signature_def=graph.signature_def)


def signature_defs(served: predict.Served):
    if served.path is None:
        raise rest.RestError("this server was not given its export's directory, which the metadata is read from", 500)
    return read_signature_defs(served.path)


def metadata_response(request, served: predict.Served):
    """GetModelMetadata's answer: the signature defs, packed in an Any as TF Serving packs them."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    check_model_spec(request, served)
    if not request.metadata_field:
        raise Refused(Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF:
            raise Refused(Code.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _answering_spec(response.model_spec, served)
    response.metadata[SIGNATURE_DEF].Pack(signature_defs(served))
    return response


def metadata_json(served: predict.Served) -> dict:
    """GET /v1/models/NAME/metadata: the gRPC answer as TF Serving's REST API writes it, each
    part in protobuf's JSON with field names kept and default values written out."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF])
    request.model_spec.name = served.name
    response = metadata_response(request, served)
    options = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
    return {"model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {SIGNATURE_DEF: json_format.MessageToDict(signature_defs(served), **options)}}


def status_response(request, served: predict.Served):
    """GetModelStatus's answer: the one version, AVAILABLE."""
    from tensorflow_serving.apis import get_model_status_pb2

    check_model_spec(request, served, status=True)
    response = get_model_status_pb2.GetModelStatusResponse()
    version = response.model_version_status.add(version=int(predict.VERSION),
                                                state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    version.status.SetInParent()  # OK, no message: set, as TF Serving sets it
    return response


# ------------------------------------------------------------------------------ services
async def _answer(context, work):
    """await work(); a refusal (or a RestError) ends the call with its status code."""
    try:
        return await work()
    except Refused as e:
        refused = e
    except rest.RestError as e:
        refused = refusal(e)
    await context.abort(refused.code, str(refused))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata (Classify, Regress and MultiInference: UNIMPLEMENTED, as TF
    Serving answers them for a model without such signatures)."""

    def __init__(self, served: predict.Served, limits: predict.Limits, state):
        self.served, self.limits, self.state = served, limits, state  # state.batcher: the app's

    async def Predict(self, request, context):
        async def work():
            start, limits = time.monotonic(), self.limits
            deadline = context.time_remaining()  # the client's, if it set one: nobody waits longer
            if deadline is not None and deadline < limits.timeout:
                limits = dataclasses.replace(limits, timeout=max(deadline, 0.0))
            signature, inputs, names = await asyncio.to_thread(parse_predict, request, self.served, limits)
            out = await predict.answer(self.state.batcher, self.served, limits, signature, inputs, start)
            return await asyncio.to_thread(predict_response, self.served, signature, out, names)
        return await _answer(context, work)

    async def GetModelMetadata(self, request, context):
        async def work():
            return await asyncio.to_thread(metadata_response, request, self.served)
        return await _answer(context, work)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED; the served model is fixed)."""

    def __init__(self, served: predict.Served):
        self.served = served

    async def GetModelStatus(self, request, context):
        async def work():
            return status_response(request, self.served)
        return await _answer(context, work)


@contextlib.asynccontextmanager
async def serving(state, served: predict.Served, limits: predict.Limits, address: tuple[str, int] | None):
    """TF Serving's gRPC API on address (host, port) while the block runs (None: no gRPC), on the
    running event loop, submitting to state.batcher. Sets state.grpc_port to the bound port; an
    address it cannot bind is a ServeError, kept in state.startup_error for the command to report."""
    state.grpc_port = state.startup_error = None
    if address is None:
        yield
        return
    host, port = address
    # The message cap is gRPC's own (RESOURCE_EXHAUSTED); no SO_REUSEPORT, so a port in use is an error.
    server = aio.server(options=[("grpc.max_receive_message_length", limits.max_body_bytes), ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(served, limits, state),
                                                                        server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(served), server)
    try:
        state.grpc_port = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError as e:
        state.startup_error = predict.ServeError(f"cannot listen on {host}:{port} for gRPC ({e})")
        raise state.startup_error from None
    await server.start()
    log.info("caption-serve: %s:%d (TF Serving's gRPC API: PredictionService, ModelService)", host, state.grpc_port)
    try:
        yield
    finally:
        await server.stop(grace=5)
