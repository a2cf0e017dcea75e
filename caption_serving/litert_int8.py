"""int8 weights for a float32 LiteRT captioner (caption_serving/litert.py's --quantize int8).

Outside the decoding loop (the image encoder, the feature projection, the decoder's start), each
convolution's and fully-connected layer's weights of at least MIN_ELEMENTS values are stored as
int8 with a float32 scale per channel, symmetric (zero point 0); inside the loop, as float16. A
builtin DEQUANTIZE op in front of each layer turns them back into float32, which the interpreter
does once, on the first run, and keeps. Every computation stays float32, activations included.

Why weights only: LiteRT's dynamic-range kernels also quantize each layer's input to int8 as they
run. The demo's random-weight encoder carries its signal in feature differences far below that
step, and such a file's captions matched the SavedModel's on none of the demo's images; it was
not faster either (docs/benchmarks.md, "LiteRT files and their latency").

Convolutions: rounded to nearest, each one's error is small (about 0.4% of its output), but over
the encoder's 94 it adds up to about 0.09 of a feature's training standard deviation, the scale
the decoder reads features in, which changed a few captions in 19. So calibration images give
each convolution's input patches' second moments X^T X, and its weights are rounded one input at
a time, each rounding error spread onto the inputs not yet rounded so that the output on such
inputs moves as little as it can (GPTQ, Frantar et al. 2022), within groups of GROUP inputs: that
cuts the features' error 2 to 4 times.

Fully-connected layers are rounded to nearest, their scales along the output rows or the input
columns, whichever rounds closer: the feature projection's weights are the trained ones divided by
each channel's training std (the converter folds the standardisation into them; the stds span
10^4, and the weights pass float16's range), so a row's largest weight is thousands of times its
typical one, and a scale per output row would round most of the row to 0. Spreading their errors
GPTQ's way changed a caption (probably because their inputs' second moments are mostly the
features' mean, not the differences that carry the signal). Inside the loop, rounded to nearest
they changed a caption near a tie, hence float16 there (the loop's inputs could not be read from
one run either: it keeps only the last step's).
"""
from __future__ import annotations

import dataclasses
import hashlib

import flatbuffers
import numpy as np
import tensorflow as tf

from caption_serving.litert_runner import SIGNATURE, litert_module

MIN_ELEMENTS = 1024   # smaller weights stay float32: biases' size, nothing to gain
GROUP = 128           # the inputs whose rounding errors are spread onto each other
DAMPING = 0.01        # added to X^T X's diagonal, as a share of its mean
CALIBRATION_IMAGES = 16


@dataclasses.dataclass
class Calibration:
    """Images like those the model will caption (uint8 [H, W, 3] each), and the weights already
    rounded with them, by their float32 bytes: files converted from the same export with other
    beam sizes hold the same encoder, which is then calibrated once."""

    images: list
    rounded: dict = dataclasses.field(default_factory=dict)


def int8_weights(data: bytes, calibration: Calibration) -> bytes:
    """A float32 LiteRT flatbuffer -> the same model with int8 weights (the module docstring)."""
    schema = litert_module("schema_py_generated")
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    layers = list(_layers(model, schema))
    pending = [(g, op, kind) for g, op, kind in layers if g == 0 and kind == "conv"
               and _key(model, g, op) not in calibration.rounded]
    moments = _second_moments(data, calibration.images, model, pending, schema) if pending else {}
    dequantize = _opcode(model, schema, schema.BuiltinOperator.DEQUANTIZE, version=5)
    for g, op, kind in layers:
        graph = model.subgraphs[g]
        tensor = graph.tensors[op.inputs[1]]
        key = _key(model, g, op)
        if key not in calibration.rounded:
            weights = np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.float32).reshape(tensor.shape)
            calibration.rounded[key] = (_round(weights, kind, moments.get((g, op.inputs[1]))) if g == 0
                                        else _half(weights))
        if calibration.rounded[key] is not None:
            _store(model, graph, op.inputs[1], *calibration.rounded[key], dequantize, schema)
    _drop_unused_buffers(model)
    builder = flatbuffers.Builder(len(data) // 3)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _layers(model, schema):
    """(subgraph, op, kind) of every layer whose weights are stored smaller, each weight tensor once."""
    kinds = {schema.BuiltinOperator.CONV_2D: "conv", schema.BuiltinOperator.DEPTHWISE_CONV_2D: "depthwise",
             schema.BuiltinOperator.FULLY_CONNECTED: "dense"}
    seen = set()
    for g, graph in enumerate(model.subgraphs):
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            kind = kinds.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if kind is None or len(op.inputs) < 2 or (g, op.inputs[1]) in seen:
                continue
            tensor = graph.tensors[op.inputs[1]]
            held = model.buffers[tensor.buffer].data
            if tensor.type == schema.TensorType.FLOAT32 and held is not None and len(held) >= 4 * MIN_ELEMENTS:
                seen.add((g, op.inputs[1]))
                yield g, op, kind


def _key(model, g: int, op) -> tuple[str, bool]:
    """A layer's weights by their bytes, and whether they are calibrated (outside the loop)."""
    tensor = model.subgraphs[g].tensors[op.inputs[1]]
    return hashlib.sha256(bytes(model.buffers[tensor.buffer].data)).hexdigest(), g == 0


# ----------------------------------------------------------------------------------- calibration
def _second_moments(data: bytes, images: list, model, convolutions: list, schema) -> dict:
    """{(subgraph, weight tensor): [G, GROUP, GROUP], X_g^T X_g for each group g of GROUP inputs}
    over the images, X a convolution's input patches as rows, in the weights' (kh, kw, cin) order
    (zero columns pad the last group), read from a float32 run that keeps every tensor."""
    interpreter_module = litert_module("interpreter")
    interpreter = interpreter_module.Interpreter(
        model_content=data, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=interpreter_module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    run = interpreter.get_signature_runner(SIGNATURE)
    moments = {}
    for pixels in images:
        run(pixels=np.ascontiguousarray(pixels, np.uint8))
        for g, op, _ in convolutions:
            rows = _patches(interpreter.get_tensor(op.inputs[0], g), model.subgraphs[g].tensors[op.inputs[1]].shape,
                            op.builtinOptions, schema)
            groups = tf.transpose(_grouped(tf.reshape(rows, [-1, rows.shape[-1]])), [1, 0, 2])
            key = (g, op.inputs[1])
            # One TensorFlow op: numpy would make a BLAS call per group, each a wait for its
            # threads, which a busy machine turns from milliseconds into seconds.
            moments[key] = moments.get(key, 0) + tf.linalg.matmul(groups, groups, transpose_a=True).numpy()
    return moments


def _grouped(x, fill: float = 0.0):
    """[n, d] (numpy or TensorFlow) -> [n, G, GROUP], d padded with columns of `fill` to G * GROUP."""
    pad = -x.shape[1] % GROUP
    if isinstance(x, np.ndarray):
        return np.pad(x, [(0, 0), (0, pad)], constant_values=fill).reshape(x.shape[0], -1, GROUP)
    return tf.reshape(tf.pad(x, [[0, 0], [0, pad]], constant_values=fill), [x.shape[0], -1, GROUP])


def _patches(x: np.ndarray, kernel_shape, options, schema):
    """A convolution's input [1, H, W, C] -> its patches [1, OH, OW, KH * KW * C]."""
    kh, kw = int(kernel_shape[1]), int(kernel_shape[2])
    if (kh, kw, options.strideH, options.strideW) == (1, 1, 1, 1):
        return x
    padding = "SAME" if options.padding == schema.Padding.SAME else "VALID"
    return tf.image.extract_patches(x, [1, kh, kw, 1], [1, options.strideH, options.strideW, 1],
                                    [1, options.dilationHFactor, options.dilationWFactor, 1], padding)


# -------------------------------------------------------------------------------------- rounding
def _round(weights: np.ndarray, kind: str, moments: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (int8 weights, float32 scales, the axis the scales run along)."""
    axis = {"conv": 0, "depthwise": 3}.get(kind) if kind != "dense" else _dense_axis(weights)
    scales = _scales(weights, axis)
    if kind == "depthwise":  # LiteRT's [1, KH, KW, C]: one input each, nothing to spread onto
        return _nearest(weights, _along(scales, axis, weights.ndim)), scales, axis
    rows = weights.reshape(weights.shape[0], -1)
    grid = np.broadcast_to(_along(scales, axis, 2), rows.shape)
    if moments is None:
        return _nearest(rows, grid).reshape(weights.shape), scales, axis
    d = rows.shape[1]
    rounded = _round_groups(_grouped(rows), _grouped(grid, fill=1.0), moments)
    return rounded.reshape(rows.shape[0], -1)[:, :d].reshape(weights.shape), scales, axis


def _round_groups(w: np.ndarray, grid: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """w, grid [rows, G, GROUP], moments [G, GROUP, GROUP] -> int8 [rows, G, GROUP]. In each
    group the inputs are rounded one at a time, the largest first, each one's error spread onto
    the rest through the inverse of X^T X (its upper Cholesky factor U, H^-1 = U^T U); the groups
    go side by side."""
    h = moments.astype(np.float64)
    diagonal = np.einsum("gii->gi", h)                # a view: writing to it writes h's diagonal
    unused = diagonal <= 0                            # an input that is always 0 (or padding)
    diagonal[unused] = 1.0
    order = np.argsort(-diagonal, axis=1, kind="stable")
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], 1), order[:, None, :], 2)
    np.einsum("gii->gi", h)[:] += DAMPING * np.mean(np.einsum("gii->gi", h), axis=1, keepdims=True)
    # H = R R^T with R upper (a Cholesky factor of H read backwards); U = R^-1. In TensorFlow,
    # for the reason in _second_moments.
    u = tf.linalg.inv(tf.linalg.cholesky(h[:, ::-1, ::-1])[:, ::-1, ::-1]).numpy()
    w = np.take_along_axis(np.where(unused, 0.0, w).astype(np.float64), order[None], 2)
    grid = np.take_along_axis(grid.astype(np.float64), order[None], 2)
    out = np.empty(w.shape, np.int8)
    for i in range(GROUP):
        q = np.clip(np.rint(w[:, :, i] / grid[:, :, i]), -127, 127)
        out[:, :, i] = q
        error = (w[:, :, i] - q * grid[:, :, i]) / u[:, i, i]
        w[:, :, i + 1:] -= error[:, :, None] * u[None, :, i, i + 1:]
    return np.take_along_axis(out, np.argsort(order, axis=1)[None], 2)


def _half(weights: np.ndarray) -> tuple[np.ndarray, None, int] | None:
    """Float16 weights (no scales), or None where they pass float16's range (they stay float32)."""
    if np.abs(weights).max() >= np.finfo(np.float16).max:
        return None
    return weights.astype(np.float16), None, 0


def _dense_axis(weights: np.ndarray) -> int:
    """A fully-connected layer's [out, in] weights: scales per output row (0) or per input
    column (1), whichever rounds closer to nearest."""
    def error(axis):
        grid = _along(_scales(weights, axis), axis, 2)
        return float(np.sum((_nearest(weights, grid) * grid - weights) ** 2))
    return min((0, 1), key=error)


def _scales(weights: np.ndarray, axis: int) -> np.ndarray:
    """Per slice along axis, the largest magnitude over 127 (1 for an all-zero slice)."""
    largest = np.abs(weights).max(axis=tuple(i for i in range(weights.ndim) if i != axis))
    return np.where(largest > 0, largest / 127, 1.0).astype(np.float32)


def _along(scales: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    return scales.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _nearest(weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(weights / grid), -127, 127).astype(np.int8)


# ------------------------------------------------------------------------------------ flatbuffer
def _store(model, graph, index: int, rounded, scales, axis: int, dequantize: int, schema) -> None:
    """The weight tensor `index` becomes the output of a DEQUANTIZE op (first in the subgraph)
    whose input is a new tensor holding the rounded weights: int8 with `scales` along `axis`, or
    float16 (scales None)."""
    tensor = graph.tensors[index]
    buffer = schema.BufferT()
    buffer.data = np.ascontiguousarray(rounded).view(np.uint8).reshape(-1)
    model.buffers.append(buffer)
    stored = schema.TensorT()
    stored.name, stored.shape, stored.buffer = tensor.name + b"/stored", tensor.shape, len(model.buffers) - 1
    stored.type = schema.TensorType.FLOAT16
    if scales is not None:
        stored.type, stored.quantization = schema.TensorType.INT8, schema.QuantizationParametersT()
        stored.quantization.scale, stored.quantization.zeroPoint = scales.tolist(), [0] * len(scales)
        stored.quantization.quantizedDimension = axis
    graph.tensors.append(stored)
    tensor.buffer = 0  # buffer 0 is the empty one: the tensor is computed now
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = dequantize, [len(graph.tensors) - 1], [index]
    graph.operators.insert(0, op)


def _opcode(model, schema, builtin: int, version: int) -> int:
    """The index of an operator code for `builtin`, added if the model has none (version: the
    lowest that reads int8 weights with per-channel scales)."""
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            code.version = max(code.version, version)
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _drop_unused_buffers(model) -> None:
    """Empty the float32 buffers no tensor reads any more."""
    used = {t.buffer for graph in model.subgraphs for t in graph.tensors}
    used |= {m.buffer for m in model.metadata or []}
    for i, buffer in enumerate(model.buffers):
        if i not in used:
            buffer.data = None
