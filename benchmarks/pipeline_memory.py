"""The preprocessing command's peak memory at two sizes, in one run.

    python -m benchmarks.pipeline_memory [--sizes 1000,4000] [--batch-size 16] [--workdir DIR]

Each size is a generated scene set run through `python -m pipelines.preprocess`
(DirectRunner, --encoder-weights random, --num-shards train=4) in a process of
its own, which reports its peak resident set size (getrusage: the process and
any workers it started). Prints the peak at each size, the memory per extra
image (target <= 0.05 MB), the peaks projected for the tutorial's subset
(20,000 images) and full COCO 2014 (123,287), and the pipeline's steady-state
images/s against the bare encoder's measured in the same run (target >= 0.8).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTED = (20_000, 123_287)


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports kilobytes


def one_run(coco: str, data: str, batch_size: int) -> dict:
    """Run the command in this process; its peak RSS and times."""
    import logging

    from caption_io import metadata
    from pipelines import preprocess

    argv = ["--coco-dir", coco, "--output", data, "--overwrite", "--encoder-weights", "random",
            "--num-shards", "train=4", "--batch-size", str(batch_size)]
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    args, beam_args = preprocess.parse_args(argv)
    args.argv = argv
    opts = preprocess.prepare(args)
    t1 = time.perf_counter()
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        preprocess.build(p, opts)
    t2 = time.perf_counter()
    train = metadata.read(data).splits["train"]
    return {"peak_mb": _peak_mb(), "launcher_s": t1 - t0, "pipeline_s": t2 - t1,
            "images_written": train.images.written, "shards": [f.records for f in train.files]}


def _measure(n: int, work: str, batch_size: int) -> dict:
    from pipelines import synthetic

    coco, data = os.path.join(work, f"coco-{n}"), os.path.join(work, f"data-{n}")
    if not os.path.exists(os.path.join(coco, "annotations")):
        synthetic.generate(coco, n_train=n, n_val=0, seed=0)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_memory", "--one", coco, data,
                           "--batch-size", str(batch_size)], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ONE ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {n}-image run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][4:]), images=n, coco=coco, data=data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,4000", help="two image counts, small,large")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where scene sets and outputs go (kept for reuse)")
    ap.add_argument("--one", nargs=2, metavar=("COCO", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ONE " + json.dumps(one_run(*args.one, args.batch_size)))
        return

    small, large = (int(x) for x in args.sizes.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="bench-memory-")
    runs = [_measure(n, work, args.batch_size) for n in (small, large)]
    a, b = runs
    per_image = (b["peak_mb"] - a["peak_mb"]) / (b["images"] - a["images"])
    marginal_rate = (b["images"] - a["images"]) / max(b["pipeline_s"] - a["pipeline_s"], 1e-9)

    from benchmarks.pipeline_throughput import bare_encoder_rate
    from caption_io import metadata

    paths = sorted(glob.glob(os.path.join(b["coco"], "train2014", "*.jpg")))[:400]
    encoder = metadata.read(b["data"]).encoder
    encoder_rate = bare_encoder_rate(encoder.name, os.path.join(b["data"], encoder.file), paths, args.batch_size)
    projected = {n: b["peak_mb"] + max(per_image, 0.0) * (n - b["images"]) for n in PROJECTED}

    for r in runs:
        print(f"{r['images']:>6} images  peak RSS {r['peak_mb']:8.1f} MB   pipeline {r['pipeline_s']:6.1f} s   "
              f"shards {r['shards']}")
    print(f"per extra image   {per_image:+.4f} MB ({b['peak_mb'] - a['peak_mb']:+.1f} MB for "
          f"{b['images'] - a['images']} more images; target <= 0.05 MB)")
    for n, mb in projected.items():
        print(f"projected peak    {mb / 1024:6.2f} GB at {n:,} images")
    print(f"throughput        {marginal_rate:.2f} images/s steady state vs bare encoder {encoder_rate:.2f} "
          f"-> ratio {marginal_rate / encoder_rate:.3f} (target >= 0.8)")
    result = {"sizes": [small, large], "peak_mb": [round(r["peak_mb"], 1) for r in runs],
              "mb_per_extra_image": round(per_image, 5),
              "projected_peak_gb": {str(n): round(mb / 1024, 2) for n, mb in projected.items()},
              "pipeline_marginal_images_per_s": round(marginal_rate, 2),
              "encoder_images_per_s": round(encoder_rate, 2),
              "ratio_marginal_to_encoder": round(marginal_rate / encoder_rate, 3)}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
