"""LiteRT files against the SavedModel they are made from: size per quantization, one-image
latency and agreement, in one run.

    python -m benchmarks.litert --model JOB_DIR/export --images IMG_OR_DIR...
            --calibration-images IMG_OR_DIR... [--beam-size 3] [--repeats 20] [--keep DIR]

Converts the export with caption_serving.litert (float32, float16 and int8, each greedy and with
--beam-size beams; int8 rounded with --calibration-images, which should not be among --images),
then prints each file's size next to the SavedModel's (its
directory), how often each file's caption equals the SavedModel's on the images, token for token,
and the median latency of one image, interleaved so that the machine's noise hits all alike:
from the file's bytes to token ids for both (the LiteRT file after PIL decodes the image, the
SavedModel's caption_images from the bytes, as each is called in practice), and the LiteRT
interpreter alone on decoded pixels. The last line is RESULT and the figures as JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else "unknown CPU"
    except OSError:
        return "unknown CPU"


def _images(sources: list[str]) -> list[str]:
    found = []
    for s in sources:
        found += sorted(glob.glob(os.path.join(s, "*.jpg"))) if os.path.isdir(s) else [s]
    return found


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _convert(model: str, folder: str, beam: int, max_length: int, calibration_images: list[str]) -> dict:
    """Every file: {(quantize, beam size): (path, bytes, seconds to convert)}. The int8 files share
    one calibration: the second is not calibrated again (its seconds show it)."""
    from caption_serving import litert

    parts = litert.load_export(model)
    calibration = litert.calibration_images(calibration_images)
    files = {}
    for quantize in litert.QUANTIZE:
        for k in sorted({1, beam}):
            path = os.path.join(folder, f"{quantize}-beam{k}.tflite")
            t = time.perf_counter()
            size, _ = litert.write(parts, model, path, k, max_length, quantize,
                                   calibration if quantize == litert.INT8 else None)
            files[quantize, k] = (path, size, time.perf_counter() - t)
            print(f"converted {path}: {size / 1e6:.1f} MB in {files[quantize, k][2]:.0f} s", file=sys.stderr)
    return files


def _agreement(runner, reference: dict, pixels: list) -> int:
    """On how many images the file's best caption is the SavedModel's, token for token."""
    same = 0
    for i, px in enumerate(pixels):
        out, n = runner.run(px), reference["lengths"][i]
        same += int(out["lengths"][0] == n and (out["tokens"][0][:n] == reference["tokens"][i][:n]).all())
    return same


def _latency(calls: dict, repeats: int) -> dict:
    """Median and spread (ms) of each call, interleaved, after two warm-up calls each."""
    for fn in calls.values():
        fn()
        fn()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an export directory")
    ap.add_argument("--images", nargs="+", required=True, help="JPEG files, or folders of them")
    ap.add_argument("--calibration-images", nargs="+", required=True,
                    help="for the int8 files: images like --images (files or folders), not among them")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--keep", help="write the files here (default: a temporary folder)")
    args = ap.parse_args()

    import tensorflow as tf

    from caption_io import images
    from caption_serving import client, litert_runner

    paths = _images(args.images)
    loaded, info = client.load_model(args.model)
    max_length = info["default_max_length"]
    blobs = [open(p, "rb").read() for p in paths]
    pixels = [images.decode(b) for b in blobs]
    sig = loaded.signatures["caption_images"]
    run = lambda k, some: sig(images=tf.constant(some), **client.option_inputs(k, max_length))
    reference = {k: {n: v.numpy() for n, v in run(k, blobs).items()} for k in sorted({1, args.beam_size})}
    folder = args.keep or tempfile.mkdtemp(prefix="litert-bench-")
    files = _convert(args.model, folder, args.beam_size, max_length, args.calibration_images)

    calls = {f"savedmodel beam{k}": (lambda k=k: run(k, blobs[:1])["tokens"].numpy()) for k in reference}
    rows = {}
    for (quantize, k), (path, size, seconds) in files.items():
        runner, _ = litert_runner.load(path)
        rows[f"{quantize} beam{k}"] = {"bytes": size, "convert_s": seconds,
                                       "agree": _agreement(runner, reference[k], pixels), "images": len(paths)}
        calls[f"litert {quantize} beam{k}"] = lambda r=runner: r.run(images.decode(blobs[0]))["tokens"]
        calls[f"litert {quantize} beam{k} (pixels in)"] = lambda r=runner: r.run(pixels[0])["tokens"]
    latency = _latency(calls, args.repeats)
    _report(args, rows, latency, _dir_size(args.model), len(paths))


def _report(args, rows: dict, latency: dict, savedmodel_bytes: int, n: int) -> None:
    print(f"{_cpu()}; {n} images; SavedModel {savedmodel_bytes / 1e6:.1f} MB")
    for name, r in rows.items():
        print(f"{name:22s} {r['bytes'] / 1e6:6.1f} MB ({r['bytes'] / savedmodel_bytes:.2f} of the SavedModel), "
              f"caption = SavedModel's on {r['agree']}/{n}")
    for name, t in latency.items():
        print(f"{name:34s} {t['median_ms']:7.1f} ms (min {t['min_ms']:.1f}, max {t['max_ms']:.1f})")
    print("RESULT " + json.dumps({"cpu": _cpu(), "images": n, "savedmodel_bytes": savedmodel_bytes,
                                  "files": rows, "latency": latency, "beam_size": args.beam_size,
                                  "repeats": args.repeats}))


if __name__ == "__main__":
    main()
