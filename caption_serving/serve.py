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
import json
import logging
import re
import socket
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from caption_io import cli, images
from caption_serving import rest
from caption_serving.client import ModelError, load_model
from caption_serving.predict import VERSION, Limits, Served, ServeError, answer, checked_inputs

if TYPE_CHECKING:
    from starlette.responses import Response

log = logging.getLogger(__name__)

PAGE = "page.html"
# The page may load nothing from elsewhere: it works offline, and a browser refuses what this omits.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data:; connect-src 'self'")
_MODEL_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<metadata>/metadata)?"
                         r"(?::(?P<verb>[A-Za-z]+))?$")


# ---------------------------------------------------------------------------- one request
def parse_request(served: Served, body: bytes, limits: Limits) -> tuple[str, str, dict[str, np.ndarray]]:
    """A predict body -> (format, signature, inputs), every image decoded once here so that a
    bad one is refused with its reason before it can fail a batch it would share."""
    request = rest.parse_json(body)
    signature = rest.signature_of(request, served.specs)
    fmt, inputs = rest.parse_inputs(request, served.specs[signature])
    return fmt, signature, checked_inputs(inputs, limits)


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


def make_app(served: Served, limits: Limits | None = None, grpc_address: tuple[str, int] | None = None):
    """The ASGI app (Starlette): the model is `served`, shared by every request. With a
    grpc_address (host, port; port 0: any free one, app.state.grpc_port says which) it serves
    TF Serving's gRPC API there too while it runs (caption_serving/grpc_api.py)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    endpoints = _Endpoints(served, limits or Limits(), grpc_address)
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
