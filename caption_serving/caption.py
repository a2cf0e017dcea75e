"""Caption your own images with an exported model.

    caption IMAGE_OR_URL... --model EXPORT_DIR [--beam-size 3] [--max-length N]
            [--plot OUT_DIR] [--json]          (or: python -m caption_serving.caption ...)
            [--num-captions K] [--no-repeat-ngram N] [--min-length M] [--length-alpha A]
    caption IMAGE_OR_URL... --model captioner.tflite [...]   (a LiteRT file: caption_serving/litert.py)

Each input is a local file, a gs:// object or an http(s) URL; --model and --plot
may be gs:// too. Prints one caption a line (`INPUT<TAB>caption` when several inputs are given), or
with --json one object a line: {"input", "caption", "score", "tokens", "attention"}
where tokens are the caption's words and attention holds, per word, the weights over the
encoder's grid of cells (row-major; export.json's "encoder" record gives the grid: 8x8 = 64 for
InceptionV3) the model used when it generated that word; <end> is not included. With
--num-captions K > 1: K lines an image (caption<TAB>log-prob, best first), or in --json
a "captions" list of {"caption", "score"}.

Every bad input gets one line `error: INPUT: reason` on stderr and the others are
still captioned. Exit status: 0 all captioned, 1 some failed, 2 usage error (bad
flags, or a --model that cannot be loaded).
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before anything imports TensorFlow
    from caption_io import quiet

    quiet.install()

import functools
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
from PIL import Image

from caption_io import cli, decoding_defaults, fileio, geometry, images, savedmodel
from caption_serving import litert_runner
from caption_serving.client import (
    ModelError,
    add_decoding_flags,
    caption_batch,
    decoding_controls,
    load_model,
    model_bytes,
)


class InputError(ValueError, cli.UserError):
    """An input that cannot be captioned; str() is the reason. Reported per input (the others
    are still captioned), and the command then exits 1."""

    exit_code = 1


# ------------------------------------------------------------------------------ reading inputs
def is_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme in ("http", "https")


def _read_capped(f, max_bytes: int) -> bytes:
    # Read one byte past the cap: that is how we know it was exceeded, without
    # ever holding more than the cap (+1) in memory.
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"larger than the {max_bytes}-byte cap (--max-bytes)")
    return data


def fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    # The timeout bounds the connection and each read, not the whole transfer;
    # the byte cap bounds the rest.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"{int(length)} bytes, larger than the {max_bytes}-byte cap (--max-bytes)")
            return _read_capped(resp, max_bytes)
    except urllib.error.HTTPError as e:
        raise InputError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise InputError(f"timed out after {timeout:g} s") from None
        raise InputError(f"cannot fetch ({getattr(e.reason, 'strerror', None) or e.reason})") from None
    except (socket.timeout, TimeoutError):
        raise InputError(f"timed out after {timeout:g} s") from None
    except OSError as e:  # connection reset mid-body, ...
        raise InputError(f"cannot fetch ({e.strerror or e})") from None


def read_file(path: str, max_bytes: int) -> bytes:
    """A local file or a gs:// object, read up to the cap."""
    try:
        with fileio.open_read(path) as f:
            return _read_capped(f, max_bytes)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except OSError as e:
        raise InputError(e.strerror or str(e)) from None


def load_input(source: str, timeout: float, max_bytes: int, savedmodel_bytes: bool = True) -> tuple[bytes, np.ndarray]:
    """-> (bytes for the model, uint8 RGB pixels for the plot); raises InputError. Without
    savedmodel_bytes the file's own bytes (a LiteRT model takes the pixels: no TensorFlow)."""
    data = fetch(source, timeout, max_bytes) if is_url(source) else read_file(source, max_bytes)
    try:
        pixels = images.decode(data)  # not an image, truncated, too many pixels: a reason each
    except images.ImageError as e:
        raise InputError(str(e)) from None
    return (model_bytes(data, pixels) if savedmodel_bytes else data), pixels


# ------------------------------------------------------------------------------------- output
def plot_name(source: str, taken: set[str]) -> str:
    """<basename>.attention.png, made unique within one run (two dirs may hold a.jpg)."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(source).path) if is_url(source) else source
    base = os.path.basename(path.rstrip("/")) or "image"
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)
    name, n = f"{base}.attention.png", 1
    while name in taken:
        n += 1
        name = f"{base}-{n}.attention.png"
    taken.add(name)
    return name


# ------------------------------------------------------------------------------------ command
def _parse_flags(argv) -> tuple:
    """-> (the parsed flags, the decoding controls); a bad flag exits 2 through the parser."""
    ap = cli.Parser(prog="caption", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_URL")
    ap.add_argument("--model", required=True, help="the SavedModel directory (JOB_DIR/export), or a .tflite file")
    ap.add_argument("--beam-size", type=int, help=f"1 is greedy decoding (default {decoding_defaults.BEAM_SIZE}; "
                    "a .tflite file: the one it was converted with)")
    ap.add_argument("--max-length", type=int, default=0,
                    help="most tokens to generate, <end> included (default: the export's)")
    ap.add_argument("--plot", metavar="OUT_DIR", help="write OUT_DIR/<name>.attention.png per image")
    ap.add_argument("--json", action="store_true", help="one JSON object a line, with scores and attention")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait on a URL (default 10)")
    ap.add_argument("--max-bytes", type=int, default=20 * 2**20,
                    help="largest image file or download, in bytes (default 20 MiB)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    add_decoding_flags(ap)
    a = ap.parse_args(argv)
    no_beams = a.beam_size is not None and a.beam_size < 1  # None: the default (a .tflite file's own)
    if no_beams or a.max_length < 0 or a.timeout <= 0 or a.max_bytes < 1 or a.batch_size < 1:
        ap.error("--beam-size, --timeout, --max-bytes and --batch-size must be positive, --max-length >= 0")
    try:
        controls = decoding_controls(a, a.beam_size or decoding_defaults.BEAM_SIZE)
    except ValueError as e:
        ap.error(str(e))
    return a, controls


def _load(a) -> tuple:
    """-> (the model, its export.json as client.export_info gives it); a model that cannot be
    loaded is a ModelError whose line names the flag (exit 2)."""
    # decode() refuses images over its own pixel cap with a clear reason; PIL's warning
    # for the same images would only be a second, noisier line.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        model, info = (litert_runner.load if litert_runner.is_litert(a.model) else load_model)(a.model)
    except ModelError as e:  # the line names the flag; exit 2 (ModelError's)
        raise ModelError(f"--model {a.model}: {e}") from None
    return model, info


def _plotter(a, info: dict):
    """plot.attention_png over the export's grid (from `info`, its export.json), with --plot's
    directory made; or None without --plot. The module is imported only here: matplotlib is
    not loaded for a run that draws nothing."""
    if not a.plot:
        return None
    from caption_serving import plot

    fileio.makedirs(a.plot)
    return functools.partial(plot.attention_png, grid=geometry.of_encoder(info.get("encoder")).grid)


def _load_inputs(sources: list[str], a) -> tuple[list, int]:
    """-> ([(source, model bytes, pixels)] of the inputs that loaded, how many failed); each
    failure gets its `error: INPUT: reason` line on stderr."""
    good, failed = [], 0
    for source in sources:
        try:
            good.append((source, *load_input(source, a.timeout, a.max_bytes, not litert_runner.is_litert(a.model))))
        except InputError as e:
            print(f"error: {source}: {e}", file=sys.stderr)
            failed += 1
    return good, failed


def _write_plot(draw, a, source: str, pixels: np.ndarray, r: dict, taken: set[str]) -> None:
    """One image's attention plot, drawn by `draw` (_plotter's), in --plot's directory, and its
    line on stderr."""
    if not r["words"]:
        print(f"{source}: empty caption, no attention plot", file=sys.stderr)
        return
    path = fileio.join(a.plot, plot_name(source, taken))
    fileio.write_bytes(path, draw(pixels, r["words"], r["attention"]))
    print(f"{source}: attention plot in {path}", file=sys.stderr)


def _print_result(a, source: str, r: dict, several: bool) -> None:
    """One image's caption(s) on stdout: a JSON object, K lines with their scores, or one line."""
    if a.json:
        # 6 decimals keep a line readable; rows still sum to 1 within 1e-4.
        line = {"input": source, "caption": r["caption"], "score": round(r["score"], 6),
                "tokens": r["words"], "attention": np.round(r["attention"].astype(float), 6).tolist()}
        if a.num_captions > 1:
            line["captions"] = [{"caption": n["caption"], "score": round(n["score"], 6)} for n in r["nbest"]]
        print(json.dumps(line, ensure_ascii=False))
    elif a.num_captions > 1:  # one line a caption, best first, each with its log-probability
        for n in r["nbest"]:
            text = f"{n['caption']}\t{n['score']:.3f}"
            print(f"{source}\t{text}" if several else text)
    else:
        print(f"{source}\t{r['caption']}" if several else r["caption"])
    sys.stdout.flush()


def _caption(model, good: list, beam_size: int | None, max_length: int, controls: dict) -> list[dict]:
    """Rows (client.rows's) for the inputs that loaded: a SavedModel takes the files' bytes, a
    LiteRT runner the pixels decoded here (beam_size None: the default, or the file's own)."""
    if isinstance(model, litert_runner.Runner):
        return model.caption_batch([pixels for _, _, pixels in good], beam_size, max_length, **controls)
    return caption_batch(model, [blob for _, blob, _ in good], beam_size or decoding_defaults.BEAM_SIZE,
                         max_length, **controls)


@cli.command
def main(argv=None) -> int:
    """The `caption` console script: called with no argv it is the process's entry, and
    cli.command puts the quiet start in before TensorFlow is imported (this module imports
    it only when a model is loaded)."""
    a, controls = _parse_flags(argv)
    model, info = _load(a)
    max_length = a.max_length or savedmodel.export_max_length(info)
    draw = _plotter(a, info)
    several, failed, taken = len(a.inputs) > 1, 0, set()

    # Inputs go in modest batches: memory stays bounded and captions appear as they come.
    for start in range(0, len(a.inputs), a.batch_size):
        good, n_failed = _load_inputs(a.inputs[start:start + a.batch_size], a)
        failed += n_failed
        if not good:
            continue
        try:
            results = _caption(model, good, a.beam_size, max_length, controls)
        except ModelError as e:  # an export older than the decoding controls, or options a LiteRT file lacks
            raise ModelError(f"--model {a.model}: {e}") from None
        for (source, _, pixels), r in zip(good, results):
            if draw is not None:
                _write_plot(draw, a, source, pixels, r, taken)
            _print_result(a, source, r, several)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
