"""Batch captioning on Beam next to calling the SavedModel directly, in the same run.

    python -m benchmarks.caption_images_throughput --model JOB_DIR/export [--images 256]
           [--batch-size 32] [--beam-size 3] [--repeats 2]

Both sides caption the same generated scene images at the same batch size and beam size,
from the files to the captions: read and check each image (the same decode and reasons),
load the model, call it batch by batch. The pipeline (pipelines.caption_images on Beam's
DirectRunner) also reshuffles, runs RunInference and writes its JSON lines, rejects and
summary. Each measurement is a fresh process, direct and pipeline interleaved so machine
noise hits both alike; the best of --repeats each. Target: the pipeline's images/s at
least 0.8x the direct loop's.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from caption_io import decoding_defaults, savedmodel


def direct(model_dir: str, paths: list[str], batch_size: int, beam_size: int) -> dict:
    """The baseline: one process, a loop over batches of files."""
    from caption_serving import client
    from pipelines.transforms import check

    t0 = time.perf_counter()
    loaded, info = client.load_model(model_dir)
    loaded_at = time.perf_counter()
    max_length = savedmodel.export_max_length(info)
    captioned = 0
    for i in range(0, len(paths), batch_size):
        blobs = []
        for p in paths[i:i + batch_size]:
            data, pixels, reason = check.read_image(p)
            if reason is None:
                blobs.append(client.model_bytes(data, pixels))
        captioned += len(client.caption_batch(loaded, blobs, beam_size, max_length))
    end = time.perf_counter()
    return {"seconds": end - t0, "load_seconds": loaded_at - t0, "captioned": captioned}


def pipeline(model_dir: str, folder: str, out: str, batch_size: int, beam_size: int) -> dict:
    from pipelines import caption_images

    t0 = time.perf_counter()
    s = caption_images.run(["--images", folder, "--model", model_dir, "--output", out, "--overwrite",
                            "--batch-size", str(batch_size), "--beam-size", str(beam_size)])
    return {"seconds": time.perf_counter() - t0, "captioned": s["captioned"], "rejected": s["rejected"]}


def _measure(kind: str, args, folder: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.caption_images_throughput", "--one", kind,
                           "--model", args.model, "--folder", folder, "--out", out,
                           "--batch-size", str(args.batch_size), "--beam-size", str(args.beam_size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an export directory")
    ap.add_argument("--images", type=int, default=256, help="scene images to caption")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--beam-size", type=int, default=decoding_defaults.BEAM_SIZE)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir")
    ap.add_argument("--one", choices=["direct", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one == "direct":
        paths = sorted(glob.glob(os.path.join(args.folder, "*")))
        print(json.dumps(direct(args.model, paths, args.batch_size, args.beam_size)))
        return
    if args.one == "pipeline":
        print(json.dumps(pipeline(args.model, args.folder, args.out, args.batch_size, args.beam_size)))
        return

    from pipelines import synthetic

    work = args.workdir or tempfile.mkdtemp(prefix="bench-caption-images-")
    synthetic.generate(os.path.join(work, "coco"), n_train=0, n_val=args.images, seed=11)
    folder = os.path.join(work, "coco", "val2014")
    n = len(os.listdir(folder))
    runs = {"direct": [], "pipeline": []}
    for _ in range(args.repeats):
        for kind in ("direct", "pipeline"):
            r = _measure(kind, args, folder, os.path.join(work, "out"))
            if r["captioned"] != n:
                sys.exit(f"error: the {kind} run captioned {r['captioned']} of {n} images")
            runs[kind].append(r)
            print(f"{kind:8s} {n / r['seconds']:6.2f} images/s ({r['seconds']:.1f} s for {n} images"
                  + (f", {r['load_seconds']:.1f} s of it loading the model)" if "load_seconds" in r else ")"),
                  flush=True)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    rate = {k: n / r["seconds"] for k, r in best.items()}
    ratio = rate["pipeline"] / rate["direct"]
    print(f"images {n}, batch {args.batch_size}, beam {args.beam_size}: pipeline {rate['pipeline']:.2f} images/s, "
          f"direct {rate['direct']:.2f} images/s, ratio {ratio:.2f} (target >= 0.8)")
    print("RESULT " + json.dumps({"images": n, "batch_size": args.batch_size, "beam_size": args.beam_size,
                                  "pipeline_images_per_s": rate["pipeline"], "direct_images_per_s": rate["direct"],
                                  "ratio": ratio}))


if __name__ == "__main__":
    main()
