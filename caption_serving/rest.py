"""TF Serving's REST predict format, both ways: a JSON body -> named numpy inputs checked
against a signature, and a signature's numpy outputs -> the JSON TF Serving answers with.

caption-serve (caption_serving/serve.py) speaks it so that code written against TF Serving
runs against it unchanged, and `rows_of` is such code: it reads either server's answer.

What TF Serving does, and so what is done here (tensorflow.org/tfx/serving/api_rest):
  - row format {"instances": [...]}: one item per batch element; with one named input an item
    is that input's value (or {name: value}), with several it is {name: value, ...} naming
    every input; each input is stacked along a new batch dimension. So an input the
    signature wants as a scalar (caption_images' beam_size, max_length) cannot be sent in
    rows: TF Serving fails such a request, and so does this, saying to use the columnar form.
  - columnar format {"inputs": value | {name: value}}: each input as its whole tensor.
  - a binary string is {"b64": "..."}; output strings are UTF-8 text unless the output's
    name ends in "_bytes" (then {"b64": ...}).
  - answers: rows -> {"predictions": [per-item value | {name: value}]}, columns ->
    {"outputs": value | {name: value}}; a failure -> {"error": "..."} with an HTTP status.
"""
from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from caption_io import savedmodel

DEFAULT_SIGNATURE = savedmodel.SERVING_DEFAULT
BYTES_SUFFIX = "_bytes"


class RestError(Exception):
    """A request TF Serving would refuse: str() is the message, `status` the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class OverLimit(RestError):
    """A request over one of the server's limits (a body, an image's pixels): REST answers with
    the error's status, gRPC with RESOURCE_EXHAUSTED, as TF Serving answers a message over its cap."""


class Spec:
    """One signature input as the parser needs it: numpy dtype, shape (None: any size)."""

    def __init__(self, dtype: str, shape: tuple):
        self.dtype, self.shape = dtype, tuple(shape)

    @classmethod
    def of(cls, tensor_spec) -> Spec:
        """From a tf.TensorSpec (a signature's structured_input_signature entry)."""
        return cls(tensor_spec.dtype.name, tuple(tensor_spec.shape.as_list()))

    @property
    def batched(self) -> bool:
        """Whether the first dimension is a batch (any size): such inputs can be stacked."""
        return len(self.shape) > 0 and self.shape[0] is None


# ------------------------------------------------------------------------------- request
def parse_json(body: bytes) -> dict:
    """The body as a JSON object, or a RestError saying why not. NaN and Infinity are
    accepted, as TF Serving accepts them."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RestError(f"JSON Parse error: {e}") from None
    if not isinstance(request, dict):
        raise RestError("JSON Parse error: the request body must be a JSON object")
    return request


def signature_of(request: dict, signatures) -> str:
    """The request's signature_name (default serving_default), checked against `signatures`."""
    name = request.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise RestError("'signature_name' must be a string")
    if name not in signatures:
        raise RestError(f'Serving signature name: "{name}" not found in signature def '
                        f"(this model has {', '.join(sorted(signatures))})")
    return name


def parse_inputs(request: dict, specs: dict[str, Spec]) -> tuple[str, dict[str, np.ndarray]]:
    """-> ("row" | "columnar", {input name: numpy array}) for a signature with these inputs."""
    if ("instances" in request) == ("inputs" in request):
        raise RestError("the request must hold exactly one of 'instances' (row format) and 'inputs' (columnar)")
    if "instances" in request:
        return "row", _rows(request["instances"], specs)
    return "columnar", _columns(request["inputs"], specs)


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _named(values: dict, specs: dict[str, Spec], where: str) -> dict:
    """Check a {name: value} object names exactly the signature's inputs."""
    if set(values) != set(specs):
        missing, extra = sorted(set(specs) - set(values)), sorted(set(values) - set(specs))
        raise RestError(f"{where}: the inputs do not match the signature's {sorted(specs)}"
                        + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    return values


def _rows(instances, specs: dict[str, Spec]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise RestError("'instances' must be a list")
    scalars = sorted(name for name, spec in specs.items() if not spec.shape)
    if scalars:
        raise RestError(f"{', '.join(scalars)}: scalar inputs (shape []) cannot be sent in the row format, which "
                        'stacks every input along a batch dimension: use the columnar format, {"inputs": {...}}')
    (only,) = specs if len(specs) == 1 else (None,)
    columns = {name: [] for name in specs}
    for i, item in enumerate(instances):
        if only is not None and not (isinstance(item, dict) and not _is_b64(item)):
            item = {only: item}  # one named input: the item is its value
        if not isinstance(item, dict) or _is_b64(item):
            raise RestError(f"instances[{i}]: with several named inputs each instance is an object naming them all")
        for name, value in _named(item, specs, f"instances[{i}]").items():
            columns[name].append(value)
    return {name: _tensor(values, specs[name], name) for name, values in columns.items()}


def _columns(inputs, specs: dict[str, Spec]) -> dict[str, np.ndarray]:
    if len(specs) == 1 and not (isinstance(inputs, dict) and not _is_b64(inputs)):
        inputs = {next(iter(specs)): inputs}
    if not isinstance(inputs, dict) or _is_b64(inputs):
        raise RestError("'inputs' must be an object naming each input")
    return {name: _tensor(value, specs[name], name) for name, value in _named(inputs, specs, "inputs").items()}


def _tensor(value, spec: Spec, name: str) -> np.ndarray:
    """A JSON (nested list) value -> numpy of the spec's dtype and a shape the spec admits."""
    leaf = _LEAVES.get(spec.dtype)
    if leaf is None:
        raise RestError(f"{name}: inputs of type {spec.dtype} are not supported")
    shape, flat = _shape_of(value), []
    _flatten(value, shape, 0, leaf, name, flat)
    array = np.empty(len(flat), dtype=object if spec.dtype == "string" else spec.dtype)
    array[:] = flat
    array = array.reshape(shape)
    check_shape(shape, spec, name)
    return array


def check_shape(shape, spec: Spec, name: str) -> None:
    """Refuse an input whose shape the signature does not take, saying which it takes."""
    shape = list(shape)
    if len(shape) != len(spec.shape) or any(want is not None and want != got for want, got in zip(spec.shape, shape)):
        want = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
        raise RestError(f"{name}: shape {shape}, the signature wants {want}")


def _shape_of(value) -> list[int]:
    """The shape a nested list claims, read down its first elements (`_flatten` checks the rest)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _flatten(value, shape: list[int], depth: int, leaf, name: str, flat: list) -> None:
    """Depth-first: every leaf converted into `flat`; a list that does not fit `shape` is refused."""
    if depth == len(shape):
        if isinstance(value, list):
            raise RestError(f"{name}: a ragged list (a list where a value was expected at depth {depth})")
        flat.append(leaf(value, name))
        return
    if not isinstance(value, list) or len(value) != shape[depth]:
        raise RestError(f"{name}: a ragged list (expected a list of {shape[depth]} at depth {depth})")
    for v in value:
        _flatten(v, shape, depth + 1, leaf, name, flat)


def _string(value, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value) and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RestError(f"{name}: invalid base64 in a {{\"b64\": ...}} value") from None
    raise RestError(f"{name}: expected a string or {{\"b64\": ...}}, got {type(value).__name__}")


def _integer(bits: int):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def leaf(value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RestError(f"{name}: expected an integer, got {json.dumps(value)[:40]}")
        if not low <= value <= high:
            raise RestError(f"{name}: {value} is out of range for int{bits}")
        return value
    return leaf


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RestError(f"{name}: expected a number, got {json.dumps(value)[:40]}")
    return value


def _boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise RestError(f"{name}: expected true or false, got {json.dumps(value)[:40]}")
    return value


_LEAVES = {"string": _string, "int32": _integer(32), "int64": _integer(64), "float32": _number,
           "float64": _number, "bool": _boolean}


# ------------------------------------------------------------------------------ response
def _plain(name: str, array: np.ndarray):
    """An output as JSON values: strings as text (base64 objects for *_bytes), numbers as numbers."""
    if array.dtype == object or array.dtype.kind == "S":
        if name.endswith(BYTES_SUFFIX):
            convert = lambda b: {"b64": base64.b64encode(b).decode("ascii")}
        else:
            convert = lambda b: b.decode("utf-8", errors="replace")
        flat = [convert(b) for b in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim else flat[0]
    return array.tolist()


def response(fmt: str, outputs: dict[str, np.ndarray]) -> dict:
    """A signature's outputs -> TF Serving's answer for a request in format `fmt`."""
    if fmt == "columnar":
        plain = {name: _plain(name, a) for name, a in outputs.items()}
        return {"outputs": next(iter(plain.values())) if len(plain) == 1 else plain}
    sizes = {name: (a.shape[0] if a.ndim else None) for name, a in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise RestError(f"the outputs' batch sizes differ ({sizes}): use the columnar format", status=500)
    n = next(iter(sizes.values()))
    plain = {name: _plain(name, a) for name, a in outputs.items()}
    if len(plain) == 1:
        return {"predictions": next(iter(plain.values()))}
    return {"predictions": [{name: values[i] for name, values in plain.items()} for i in range(n)]}


def status(version: str) -> dict:
    """A model's status, as TF Serving gives it for a loaded version."""
    return {"model_version_status": [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


def dumps(obj) -> bytes:
    """JSON as TF Serving writes it: NaN and Infinity as bare tokens (JavaScript reads them)."""
    return json.dumps(obj, allow_nan=True, separators=(",", ":")).encode("utf-8")


# -------------------------------------------------------------------------------- client
def rows_of(answer: dict) -> list[dict]:
    """A captioner's predict answer from TF Serving or caption-serve, row or columnar, ->
    per image what client.rows gives ({"caption", "score", "words", "attention"}, and "nbest"
    when the answer holds the n-best outputs: caption_images' and caption_features')."""
    from caption_serving import client

    if "error" in answer:
        raise RestError(answer["error"])
    names = (*savedmodel.OUTPUTS, *savedmodel.NBEST_OUTPUTS)
    if "predictions" in answer:
        items = answer["predictions"]
        columns = {k: [item[k] for item in items] for k in names if k in items[0]}
    else:
        columns = {k: answer["outputs"][k] for k in names if k in answer["outputs"]}
    floats = (savedmodel.SCORES, savedmodel.ATTENTION, savedmodel.NBEST_SCORES, savedmodel.NBEST_ATTENTION)
    texts = (savedmodel.CAPTIONS, savedmodel.NBEST_CAPTIONS)
    out = {k: np.asarray(v, dtype=np.float32 if k in floats else None) for k, v in columns.items() if k not in texts}
    for k in texts:  # as the SavedModel gives them: UTF-8 bytes
        if k in columns:
            out[k] = np.vectorize(lambda c: c.encode("utf-8"), otypes=[object])(np.array(columns[k], dtype=object))
    return client.rows(out)
