"""A TF Serving REST predict body for image files, small enough for Vertex AI.

    python -m caption_serving.request IMAGE... [--max-request-bytes 1500000] [--max-side 640] > body.json
    curl -s -X POST localhost:8501/v1/models/captioner:predict -d @body.json

Writes {"instances": [{"b64": ...}, ...]} (serving_default: the export's beam size and length).
Vertex AI's online prediction refuses requests over 1.5 MB, and base64 makes a file 4/3 its
size, so a photo straight from a phone does not fit. Images that would push the body over
--max-request-bytes are re-encoded as JPEG with their longer side at most --max-side pixels;
the model resizes every image to 299x299 anyway, so 640 loses nothing it would see. Images
already small enough are sent as they are, byte for byte.
"""
from __future__ import annotations

import base64
import io
import json
import sys

from PIL import Image

from caption_io import cli, images

VERTEX_MAX_REQUEST_BYTES = 1_500_000
MAX_SIDE = 640


class RequestError(ValueError, cli.UserError):
    """An input that cannot go into the body, or a body that cannot fit; exit 2."""


def shrink(data: bytes, max_side: int = MAX_SIDE, quality: int = 90) -> bytes:
    """An image file -> a JPEG whose longer side is at most max_side (smaller images keep their size)."""
    pixels = images.decode(data)  # the reasons every command gives for a bad file
    img = Image.fromarray(pixels)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _b64_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


def body(blobs: list[bytes], max_request_bytes: int = VERTEX_MAX_REQUEST_BYTES, max_side: int = MAX_SIDE) -> bytes:
    """The row-format body for these image files, each shrunk (largest first) while the body is
    over max_request_bytes. Raises RequestError when even shrunk images do not fit."""
    blobs = list(blobs)
    shrunk = set()
    overhead = len('{"instances": []}') + len(blobs) * len('{"b64": ""}, ')

    def size():
        return overhead + sum(_b64_size(len(b)) for b in blobs)

    for i in sorted(range(len(blobs)), key=lambda i: -len(blobs[i])):
        if size() <= max_request_bytes:
            break
        blobs[i] = shrink(blobs[i], max_side)
        shrunk.add(i)
    if size() > max_request_bytes:
        raise RequestError(f"{len(blobs)} images do not fit in {max_request_bytes} bytes even at {max_side} pixels "
                           "a side; send fewer images a request")
    return json.dumps({"instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in blobs]}).encode()


@cli.command
def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m caption_serving.request", description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", metavar="IMAGE")
    ap.add_argument("--max-request-bytes", type=int, default=VERTEX_MAX_REQUEST_BYTES,
                    help="the largest body (default 1,500,000: Vertex AI's online prediction limit)")
    ap.add_argument("--max-side", type=int, default=MAX_SIDE, help="longer side of a shrunk image (default 640)")
    a = ap.parse_args(argv)
    if a.max_request_bytes < 1 or a.max_side < 1:
        ap.error("--max-request-bytes and --max-side must be positive")
    blobs = []
    for path in a.images:
        try:
            with open(path, "rb") as f:
                blobs.append(f.read())
            images.decode(blobs[-1])
        except OSError as e:
            raise RequestError(f"{path}: {e.strerror or e}") from None
        except images.ImageError as e:
            raise RequestError(f"{path}: {e}") from None
    sys.stdout.buffer.write(body(blobs, a.max_request_bytes, a.max_side) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
