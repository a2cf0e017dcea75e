"""Serve an exported captioner over TF Serving's REST and gRPC APIs, with a page that shows where it looked.

    caption-serve --model EXPORT_DIR [--host 127.0.0.1] [--port 8501] [--grpc-port 8500] [--model-name captioner]
                  [--max-body-bytes 33554432] [--max-pixels 100000000] [--timeout 60] [--max-batch 16]
                  (or: python -m caption_serving.serve ...)

  POST /v1/models/NAME[/versions/1]:predict  TF Serving's predict: row ("instances") or columnar
                                             ("inputs") bodies, {"b64": ...} binaries, signature_name
  GET  /v1/models/NAME[/versions/1]          the model's status, as TF Serving gives it
  GET  /v1/models/NAME[/versions/1]/metadata its signature defs, as TF Serving gives them
  GET  /                                     a page: drop an image, read its captions with their
                                             scores, point at a word to see where the model looked
  gRPC on --grpc-port (0: off)               TF Serving's Predict, GetModelMetadata, GetModelStatus

For development, and as TF Serving's stand-in where it is not installed: code written against
one runs against the other (caption_serving/rest.py has the format). Errors come as TF
Serving's {"error": "..."} with an HTTP status: 400 a request it cannot run (bad JSON, an input
the signature does not have, a file that is not an image, an image over --max-pixels), 404 an
unknown model or version, 413 a body over --max-body-bytes, 504 no answer within --timeout.

The model is loaded once; concurrent requests of either API are queued and run in batches, one
model call at a time (caption_serving/batcher.py). It listens on 127.0.0.1 unless told otherwise:
it has no authentication or TLS, so put it behind a reverse proxy before it faces a network.
Exit status: 0 when stopped with Ctrl-C, 2 usage error (bad flags, a --model that cannot be
loaded, an address it cannot listen on).
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before anything imports TensorFlow
    from caption_io import quiet

    quiet.install()

import contextlib
import importlib.resources
import io
import json
import logging
import re
import socket
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from caption_io import cli, geometry, images, savedmodel, tokenizer, vocab
from caption_serving import rest
from caption_serving.client import CONTROL_DEFAULTS, ModelError, load_model, model_bytes

if TYPE_CHECKING:
    from starlette.responses import Response

log = logging.getLogger(__name__)

VERSION = "1"                # an export directory is one version: TF Serving would call it 1
PAGE = "page.html"
# The page may load nothing from elsewhere: it works offline, and a browser refuses what this omits.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data:; connect-src 'self'")
_MODEL_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<metadata>/metadata)?"
                         r"(?::(?P<verb>[A-Za-z]+))?$")


class ServeError(ValueError, cli.UserError):
    """A flag or an address the server cannot use; str() is the reason."""


@dataclass(frozen=True)
class Limits:
    """What one request may cost: its body, each image's pixels, the seconds it may wait for the
    model (queue included), and the most images one model call takes."""

    max_body_bytes: int = 32 * 2**20   # a 20 MiB image is 27 MiB as base64
    max_pixels: int = images.MAX_PIXELS
    timeout: float = 60.0
    max_batch: int = 16


class Served:
    """The loaded export as the server needs it: each signature's inputs, and the call. `path`,
    the export's directory, is where the metadata's signature defs are read (None: no metadata)."""

    def __init__(self, loaded, info: dict, name: str = "captioner", path: str | None = None):
        self.loaded, self.info, self.name, self.path = loaded, info, name, path
        self.specs = {sig: {k: rest.Spec.of(v) for k, v in fn.structured_input_signature[1].items()}
                      for sig, fn in loaded.signatures.items()}

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One model call (the batcher's worker thread makes them, one at a time)."""
        import tensorflow as tf

        specs = self.specs[signature]
        out = self.loaded.signatures[signature](**{k: tf.constant(v, dtype=tf.as_dtype(specs[k].dtype))
                                                   for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}

    def batched(self, signature: str) -> frozenset[str]:
        return frozenset(k for k, s in self.specs[signature].items() if s.batched)

    def page_config(self, limits: Limits) -> dict:
        """What the page needs to know: the endpoint, the defaults, the limits, what the export takes."""
        return {"model": self.name, "predict": f"/v1/models/{self.name}:predict",
                "signature": savedmodel.CAPTION_IMAGES,
                "beam_size": savedmodel.export_beam_size(self.info),
                "max_length": savedmodel.export_max_length(self.info),
                "num_captions": savedmodel.NUM_CAPTIONS in self.specs[savedmodel.CAPTION_IMAGES],
                # The decoding controls the page does not offer go at decoding's defaults (a
                # signature's every input must be sent; older exports take none of them).
                "fixed": {k: v for k, v in CONTROL_DEFAULTS.items()
                          if k in self.specs[savedmodel.CAPTION_IMAGES] and k != savedmodel.NUM_CAPTIONS},
                "max_body_bytes": limits.max_body_bytes, "max_pixels": limits.max_pixels,
                "first_word_id": vocab.FIRST_WORD_ID,
                "piece_label": tokenizer.PIECE_LABEL,  # marks a token that continues its word
                # The encoder's grid of cells, [rows, columns]: the shape of a word's attention.
                "grid": list(geometry.of_encoder(self.info.get("encoder")).grid)}


# ---------------------------------------------------------------------------- one request
def parse_request(served: Served, body: bytes, limits: Limits) -> tuple[str, str, dict[str, np.ndarray]]:
    """A predict body -> (format, signature, inputs), every image decoded once here so that a
    bad one is refused with its reason before it can fail a batch it would share."""
    request = rest.parse_json(body)
    signature = rest.signature_of(request, served.specs)
    fmt, inputs = rest.parse_inputs(request, served.specs[signature])
    return fmt, signature, checked_inputs(inputs, limits)


def checked_inputs(inputs: dict[str, np.ndarray], limits: Limits) -> dict[str, np.ndarray]:
    """A request's inputs (either API's), the options and images checked: the images decoded
    and passed on as client.model_bytes gives them. Raises a RestError (rest.OverLimit) saying why."""
    for name in (savedmodel.BEAM_SIZE, savedmodel.MAX_LENGTH, savedmodel.NUM_CAPTIONS):
        if name in inputs and (inputs[name] < 1).any():
            raise rest.RestError(f"{name} must be at least 1")
    blobs = inputs.get(savedmodel.IMAGES)
    if blobs is not None and blobs.size == 0:  # the export's encoder cannot run an empty batch
        raise rest.RestError("no images in the request")
    if blobs is not None and blobs.dtype == object:
        checked = [checked_image(b, i, limits.max_pixels) for i, b in enumerate(blobs.reshape(-1))]
        inputs[savedmodel.IMAGES] = np.array(checked, dtype=object).reshape(blobs.shape)
    return inputs


def checked_image(data: bytes, index: int, max_pixels: int) -> bytes:
    """Image bytes the SavedModel will read (client.model_bytes), or a RestError naming the
    image and what is wrong with it. The pixel cap is read from the header, before decoding."""
    with contextlib.suppress(OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise rest.OverLimit(f"images[{index}]: image too large ({img.width}x{img.height} pixels, "
                                     f"the cap is {max_pixels})")
    try:
        return model_bytes(data, images.decode(data))
    except images.ImageError as e:  # not an image, truncated, empty: decode says which
        raise rest.RestError(f"images[{index}]: {e}") from None


def trimmed(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokens, their text and attention (and their n-best) cut to the request's own longest caption. A batch
    pads them to its longest hypothesis, so without the cut a request's answer would depend on
    who shared its batch; with it, the same request gets the same answer however it was batched
    (TF Serving's answer can have more trailing <pad> columns: `lengths` says where each caption ends)."""
    out = dict(out)
    for names, ndim in ((savedmodel.BEST, 1), (savedmodel.NBEST, 2)):
        lengths, tokens, attention = (out.get(k) for k in (names.lengths, names.tokens, names.attention))
        if lengths is None or tokens is None or attention is None or lengths.ndim != ndim \
                or tokens.ndim != ndim + 1:
            continue
        steps = int(lengths.max()) if lengths.size else 0
        out[names.tokens] = tokens[..., :steps]
        out[names.attention] = attention[..., :steps, :]
        if names.token_text in out:  # exports made before it lack it
            out[names.token_text] = out[names.token_text][..., :steps]
    return out


async def answer(batcher, served: Served, limits: Limits, signature: str, inputs: dict[str, np.ndarray],
                 start: float) -> dict[str, np.ndarray]:
    """Checked inputs -> their outputs, trimmed: both APIs' model call, through the one batcher, within
    --timeout of `start` (time.monotonic()). A failed call's RestError has the model's error as __cause__."""
    left = limits.timeout - (time.monotonic() - start)
    try:
        out = await batcher.submit(signature, inputs, served.batched(signature), max(left, 0.0))
    except TimeoutError:
        raise rest.RestError(f"no answer within {limits.timeout:g} s (--timeout)", 504) from None
    except Exception as e:
        raise model_error(e) from e
    return trimmed(out)


def model_error(e: Exception) -> rest.RestError:
    """A failed model call as TF Serving reports it: its argument errors are the request's (400)."""
    import tensorflow as tf

    message = cli.one_line(getattr(e, "message", None) or e)
    if isinstance(e, (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError)):
        return rest.RestError(message, 400)
    log.error("model call failed", exc_info=e)
    return rest.RestError(f"internal error: {message}", 500)


# -------------------------------------------------------------------------------- the app
# Starlette and uvicorn are the `serve` extra: they are imported where the app is made or run, so
# this module imports without them and the command can say what to install.
def _page(served: Served, limits: Limits) -> str:
    """The attention page, with what it needs to know about the served model written into it."""
    page = (importlib.resources.files("caption_serving") / PAGE).read_text("utf-8")
    # JSON inside <script>: "<" escaped so no value can close the element.
    return page.replace("__CONFIG__", json.dumps(served.page_config(limits)).replace("<", "\\u003c"))


def _json(content: dict, status: int = 200) -> Response:
    """JSON as TF Serving answers: an error is {"error": message} with its HTTP status."""
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


async def _read_body(request, limits: Limits) -> bytes:
    """The body, refused with 413 once it passes the cap (declared or streamed)."""
    too_big = rest.OverLimit(f"request body larger than {limits.max_body_bytes} bytes (--max-body-bytes)", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _rest_error(request, e: rest.RestError) -> Response:
    return _json({"error": str(e)}, e.status)


async def _http_error(request, e) -> Response:
    return _json({"error": e.detail}, e.status_code)


class _Endpoints:
    """The app's endpoints and lifespan over one served model and its limits, which every
    request shares; the batcher lives in the app's state from start-up to shut-down."""

    def __init__(self, served: Served, limits: Limits, grpc_address: tuple[str, int] | None):
        self.served, self.limits, self.grpc_address = served, limits, grpc_address
        self.page = _page(served, limits)

    async def predict(self, request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        served, limits = self.served, self.limits
        start = time.monotonic()
        body = await _read_body(request, limits)
        fmt, signature, inputs = await run_in_threadpool(parse_request, served, body, limits)
        out = await answer(request.app.state.batcher, served, limits, signature, inputs, start)
        payload = await run_in_threadpool(lambda: rest.dumps(rest.response(fmt, out)))
        return Response(payload, media_type="application/json")

    async def models(self, request) -> Response:
        """/v1/models/NAME[/versions/V][:verb]: TF Serving's routes for one model, one version."""
        m = _MODEL_PATH.match(request.path_params["rest"])
        if not m:
            return _json({"error": f"Malformed request: {request.method} {request.url.path}"}, 404)
        name, version, verb = m["name"], m["version"], m["verb"]
        if name != self.served.name or version not in (None, VERSION):
            which = f"Specific({name}, {version})" if version else f"Latest({name})"
            return _json({"error": f"Servable not found for request: {which}"}, 404)
        if request.method == "GET" and verb is None:
            from caption_serving import grpc_api  # the metadata: TF Serving's gRPC answer, as JSON

            return _json(grpc_api.metadata_json(self.served) if m["metadata"] else rest.status(VERSION))
        if request.method == "POST" and verb == "predict" and not m["metadata"]:
            return await self.predict(request)
        return _json({"error": f"Malformed request: {request.method} {request.url.path} (caption-serve answers "
                               "POST ...:predict, GET of the model status and GET .../metadata)"}, 404)

    async def index(self, request) -> Response:
        from starlette.responses import HTMLResponse

        return HTMLResponse(self.page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        from caption_serving import grpc_api
        from caption_serving.batcher import Batcher

        app.state.batcher = Batcher(self.served.run, self.limits.max_batch)
        app.state.batcher.start()
        try:  # gRPC on this event loop, so that it shares the batcher
            async with grpc_api.serving(app.state, self.served, self.limits, self.grpc_address):
                yield
        finally:
            await app.state.batcher.stop()


def make_app(served: Served, limits: Limits = Limits(), grpc_address: tuple[str, int] | None = None):
    """The ASGI app (Starlette): the model is `served`, shared by every request. With a
    grpc_address (host, port; port 0: any free one, app.state.grpc_port says which) it serves
    TF Serving's gRPC API there too while it runs (caption_serving/grpc_api.py)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    endpoints = _Endpoints(served, limits, grpc_address)
    return Starlette(routes=[Route("/", endpoints.index, methods=["GET"]),
                             Route("/v1/models/{rest:path}", endpoints.models, methods=["GET", "POST"])],
                     exception_handlers={rest.RestError: _rest_error, HTTPException: _http_error},
                     lifespan=endpoints.lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so that an address in use is one error line, not uvicorn's exit."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def _parse_flags(argv):
    """The command's flags, checked; a bad one exits 2 through the parser."""
    ap = cli.Parser(prog="caption-serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SavedModel directory (JOB_DIR/export)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8501, help="TCP port (default 8501, TF Serving's REST port)")
    ap.add_argument("--grpc-port", type=int, default=8500,
                    help="TCP port of TF Serving's gRPC API, on --host (default 8500, TF Serving's; 0: none)")
    ap.add_argument("--model-name", default="captioner", help="the NAME in /v1/models/NAME (default captioner)")
    d = Limits()
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                    help=f"largest request body or gRPC message; larger ones get 413 or RESOURCE_EXHAUSTED "
                         f"(default {d.max_body_bytes})")
    ap.add_argument("--max-pixels", type=int, default=d.max_pixels,
                    help=f"largest image, width x height (default and most {d.max_pixels})")
    ap.add_argument("--timeout", type=float, default=d.timeout,
                    help=f"seconds a request may wait for its captions, queue included (default {d.timeout:g})")
    ap.add_argument("--max-batch", type=int, default=d.max_batch,
                    help=f"most images in one model call (default {d.max_batch})")
    a = ap.parse_args(argv)
    if not (0 <= a.port <= 65535 and 0 <= a.grpc_port <= 65535):
        ap.error("--port and --grpc-port must be in 0..65535")
    if a.max_body_bytes < 1 or a.max_pixels < 1 or a.timeout <= 0 or a.max_batch < 1:
        ap.error("--max-body-bytes, --max-pixels, --timeout and --max-batch must be positive")
    if a.max_pixels > images.MAX_PIXELS:
        ap.error(f"--max-pixels can be at most {images.MAX_PIXELS} (the decoder's own cap)")
    if not re.fullmatch(r"[^/:\s]+", a.model_name):
        ap.error("--model-name may not hold '/', ':' or spaces")
    return a


@cli.command
def main(argv=None) -> int:
    """The `caption-serve` console script."""
    a = _parse_flags(argv)
    try:
        import uvicorn
    except ImportError:
        raise ServeError("caption-serve needs Starlette and uvicorn: pip install -e '.[serve]'") from None

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode refuses them with a reason
    sock = listen(a.host, a.port)  # before the model loads: a port in use fails at once
    if a.grpc_port:
        listen(a.host, a.grpc_port).close()  # the same for gRPC's, which is bound once the app runs
    with contextlib.closing(sock):
        try:
            loaded, info = load_model(a.model)
        except ModelError as e:
            raise ModelError(f"--model {a.model}: {e}") from None
        limits = Limits(a.max_body_bytes, a.max_pixels, a.timeout, a.max_batch)
        app = make_app(Served(loaded, info, a.model_name, a.model), limits,
                       (a.host, a.grpc_port) if a.grpc_port else None)
        host, port = sock.getsockname()[:2]
        log.info("caption-serve: http://%s:%d/ (the page), http://%s:%d/v1/models/%s:predict (TF Serving's REST API)",
                 host, port, host, port, a.model_name)
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=cli.is_verbose(),
                                               timeout_graceful_shutdown=5))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed the Ctrl-C on
            pass
    if getattr(app.state, "startup_error", None):
        raise app.state.startup_error
    log.info("caption-serve: stopped")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
