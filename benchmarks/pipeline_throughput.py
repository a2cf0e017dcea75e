"""Preprocessing throughput next to the bare encoder's, in the same run, for one backbone or each.

    python -m benchmarks.pipeline_throughput [--encoder inception_v3|...|all] [--images 800] [--batch-size 16]
           [--encoder-precision float32|bfloat16]

The encoder is the real cost of preprocessing; decoding, tokenising, Beam and
record writing should hide behind it. For each backbone (model/backbones.py; --encoder-weights
random; float32, or bfloat16 with --encoder-precision, in the pipeline and bare alike) prints
images/s for both, their ratio (target >= 0.8), and the bytes per image in the shards against
the float16 features (positions x channels x 2 bytes: 8x8x2048 -> 262,144 for InceptionV3, 7x7x960 -> 94,080 for
MobileNetV3-Large) plus the captions (target within 5%), then a RESULT JSON line.
`--encoder all` measures every backbone in this process, one after another, at the
same --images, and ends with a table of them all. The docs' table comes from

    python -m benchmarks.pipeline_throughput --encoder all --images 200

(ConvNeXt-Tiny and EfficientNetV2-S encode only ~3-6 images/s on a 2-core CPU,
so `all` at the default 800 images takes a long time.)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np


def bare_encoder_rate(backbone: str, weights_path: str, image_paths: list[str], batch_size: int,
                      compute: str = "float32") -> float:
    import tensorflow as tf

    from caption_io import images
    from model import backbones, precision

    backbone = backbones.get(backbone)
    model = backbone.load(weights_path)
    precision.set_compute(model, compute)
    call = tf.function(lambda x: precision.encode(model, x), reduce_retracing=True)
    pixels = [backbone.prepare(images.decode(open(p, "rb").read())[None]).numpy()[0] for p in image_paths]
    batches = [np.stack(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    call(batches[0])  # trace and warm up outside the timing
    t = time.perf_counter()
    for b in batches:
        call(b).numpy()
    return len(pixels) / (time.perf_counter() - t)


def scene_set(work: str, n: int) -> str:
    """A generated scene set of n training images under work (made once, shared by the backbones)."""
    from pipelines import synthetic

    coco = os.path.join(work, f"coco-{n}")
    if not os.path.exists(os.path.join(coco, "annotations")):
        synthetic.generate(coco, n_train=n, n_val=0, seed=0)
    return coco


def timed_run(coco: str, data: str, encoder: str, batch_size: int, compute: str = "float32"):
    """(launcher seconds, Beam pipeline seconds, the prepared options) of preprocessing coco into data."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import preprocess

    t0 = time.perf_counter()
    pargs, beam_args = preprocess.parse_args(["--coco-dir", coco, "--output", data, "--overwrite",
                                              "--encoder", encoder, "--encoder-weights", "random",
                                              "--num-shards", "4", "--batch-size", str(batch_size),
                                              "--encoder-precision", compute])
    pargs.argv = []
    opts = preprocess.prepare(pargs)
    t1 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        preprocess.build(p, opts)
    return t1 - t0, time.perf_counter() - t1, opts


def storage(data: str, opts: dict) -> dict:
    """Shard bytes per image against the float16 features plus the captions' payload."""
    from caption_io import datadir, records

    files = glob.glob(datadir.shard_glob(data, "train"))
    shard_bytes = sum(os.path.getsize(p) for p in files)
    shape = opts["static"].features.shape
    recs = records.read_records(files, shape)
    feature_bytes = int(np.prod(shape)) * 2
    # The captions' payload: their UTF-8 text plus one byte per token id (varint).
    caption_bytes = sum(len(t.encode()) for r in recs for t in r["caption_text"]) + \
        sum(len(c) for r in recs for c in r["captions"])
    per_image = shard_bytes / len(recs)
    floor = feature_bytes + caption_bytes / len(recs)
    return {"shard_bytes_per_image": round(per_image), "feature_bytes_per_image": feature_bytes,
            "features_plus_captions_bytes_per_image": round(floor),
            "storage_overhead": round(per_image / floor - 1, 4)}


def measure(encoder: str, images: int, batch_size: int, work: str, compute: str = "float32") -> dict:
    """One backbone's figures (the RESULT line's dict): the pipeline at images/2 and images, the
    bare encoder on the same images, and the shards' bytes; the encoder computing in `compute`."""
    from model import backbones

    g = backbones.get(encoder).geometry
    # Two sizes: the difference cancels what every run pays once (Beam start-up,
    # loading the encoder in the worker, writing metadata), which a real run of
    # 100k images never notices; the marginal rate is the steady state.
    half = images // 2
    _, t_half, _ = timed_run(scene_set(work, half), os.path.join(work, f"data-{encoder}-{half}"), encoder, batch_size,
                             compute)
    coco, data = scene_set(work, images), os.path.join(work, f"data-{encoder}-{images}")
    launch, t_full, opts = timed_run(coco, data, encoder, batch_size, compute)
    pipeline_rate = images / t_full
    marginal_rate = (images - half) / max(t_full - t_half, 1e-9)
    command_rate = images / (launch + t_full)
    paths = sorted(glob.glob(os.path.join(coco, "train2014", "*.jpg")))
    encoder_rate = bare_encoder_rate(encoder, opts["encoder_path"], paths, batch_size, compute)
    return {
        "encoder": encoder, "encoder_precision": compute, "input_size": g.input_size,
        "features": f"{g.rows}x{g.columns}x{g.channels}",
        "images": images, "batch_size": batch_size,
        "encoder_images_per_s": round(encoder_rate, 2),
        "pipeline_images_per_s": round(pipeline_rate, 2),
        "ratio_pipeline_to_encoder": round(pipeline_rate / encoder_rate, 3),
        "pipeline_marginal_images_per_s": round(marginal_rate, 2),
        "ratio_marginal_to_encoder": round(marginal_rate / encoder_rate, 3),
        "whole_command_images_per_s": round(command_rate, 2),
        "ratio_whole_command_to_encoder": round(command_rate / encoder_rate, 3),
        "launcher_seconds": round(launch, 1),
        **storage(data, opts),
    }


def report(r: dict) -> None:
    """One backbone's figures in words, then its RESULT line."""
    print(f"encoder           {r['encoder']} ({r['input_size']} px -> {r['features']} features, "
          f"{r['feature_bytes_per_image']:,} bytes float16)")
    print(f"bare encoder      {r['encoder_images_per_s']:7.2f} images/s (batch {r['batch_size']})")
    print(f"pipeline          {r['pipeline_marginal_images_per_s']:7.2f} images/s steady state "
          f"({r['images'] // 2} -> {r['images']} images) -> ratio {r['ratio_marginal_to_encoder']:.3f} "
          "(target >= 0.8)")
    print(f"pipeline, 1 run   {r['pipeline_images_per_s']:7.2f} images/s incl. Beam start-up and the worker "
          f"loading the encoder -> ratio {r['ratio_pipeline_to_encoder']:.3f}")
    print(f"whole command     {r['whole_command_images_per_s']:7.2f} images/s  "
          f"(incl. {r['launcher_seconds']:.1f}s building/saving the encoder and manifest)")
    print(f"storage           {r['shard_bytes_per_image']:,} bytes/image vs "
          f"{r['features_plus_captions_bytes_per_image']:,} features+captions "
          f"-> {100 * r['storage_overhead']:+.2f}% (target within 5%)")
    print("RESULT " + json.dumps(r), flush=True)


def table(results: list[dict]) -> None:
    """Every backbone measured, one line each."""
    print(f"\n{'backbone':<20} {'input':>5} {'grid x channels':>15} {'encoder/s':>9} {'pipeline/s':>10} "
          f"{'ratio':>6} {'bytes/image':>11} {'overhead':>8}")
    for r in results:
        print(f"{r['encoder']:<20} {r['input_size']:>5} {r['features']:>15} {r['encoder_images_per_s']:>9.2f} "
              f"{r['pipeline_marginal_images_per_s']:>10.2f} {r['ratio_marginal_to_encoder']:>6.3f} "
              f"{r['shard_bytes_per_image']:>11,} {100 * r['storage_overhead']:>+7.2f}%")
    print("(pipeline/s: steady state; ratio: pipeline / bare encoder, target >= 0.8; "
          "overhead: shard bytes vs features+captions, target within 5%)")


def main():
    from model import backbones

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default=backbones.DEFAULT, choices=(*backbones.NAMES, "all"),
                    help="the backbone to measure, or all of them one after another")
    ap.add_argument("--images", type=int, default=800, help="images of each pipeline run (and each backbone)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--encoder-precision", default="float32", choices=("float32", "bfloat16"),
                    help="what the encoder computes in, in the pipeline and bare (model/precision.py)")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-")
    names = backbones.NAMES if args.encoder == "all" else (args.encoder,)
    results = []
    for name in names:
        results.append(measure(name, args.images, args.batch_size, work, args.encoder_precision))
        report(results[-1])
    if args.encoder == "all":
        table(results)


if __name__ == "__main__":
    main()
