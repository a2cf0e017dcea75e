"""The image encoder in float32 and in bfloat16 (--encoder-precision), in one run.

    python -m benchmarks.encoder_precision [--encoder inception_v3] [--batch-size 16] [--repeats 10]
           [--weights random|imagenet|PATH]

One network, one batch of generated scene images at the pipeline's batch size (preprocess's
--batch-size default, 16), the encoder's call in each precision (model/precision.py: Keras'
mixed_bfloat16 on every layer, float32 out), traced and warmed, then timed in turns, the order
swapped each round, --repeats times each; images/s from the medians, and their ratio (the target
on a CPU with bfloat16 matrix units, AMX: >= 2.5). Each image's cosine similarity of its bfloat16
features to its float32 ones, as computed and as the shards store them (float16; target >= 0.999
per image). Then what `--encoder-precision auto` picks on this machine for this encoder: its probe's
speedup, then (where the probe passes) the speedup measured above. The last line is RESULT and the
figures as JSON.

Random weights (the default; seeded) time the network as well as trained ones do, but their
features say less about bfloat16's effect on trained features: give --weights imagenet (or a
weights file) where they can be had.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _batch(backbone, n: int) -> np.ndarray:
    """n generated scene images, as the encoder's input [n, size, size, 3]."""
    from caption_io import images
    from pipelines import synthetic

    with tempfile.TemporaryDirectory() as scenes:
        synthetic.generate(scenes, n_train=n, n_val=0, seed=11)
        folder = os.path.join(scenes, "train2014")
        paths = sorted(os.listdir(folder))[:n]
        pixels = [images.decode(open(os.path.join(folder, p), "rb").read()) for p in paths]
    return np.stack([backbone.prepare(p[None]).numpy()[0] for p in pixels])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure(encoder: str, batch_size: int, repeats: int, weights: str, seed: int = 0) -> dict:
    import tensorflow as tf

    from model import backbones, precision

    backbone = backbones.get(encoder)
    model = backbone.build(weights, seed)
    pixels = tf.constant(_batch(backbone, batch_size))
    size = backbone.geometry.input_size
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    calls, features = {}, {}
    for name in (precision.FLOAT32, precision.BFLOAT16):  # each traced under its own policies
        precision.set_compute(model, name)
        calls[name] = tf.function(lambda x: precision.encode(model, x), input_signature=spec)
        features[name] = calls[name](pixels).numpy()  # the trace and a warm-up call
        calls[name](pixels).numpy()
    seconds = precision.in_turns({name: (lambda call=call: call(pixels).numpy()) for name, call in calls.items()},
                                 repeats)
    rate = {name: batch_size / s for name, s in seconds.items()}
    computed = _cosines(features["bfloat16"], features["float32"])
    stored = _cosines(*(features[n].astype(np.float16).astype(np.float32) for n in ("bfloat16", "float32")))
    probe = precision.measure()
    auto = precision.choose(precision.AUTO, lambda: probe, work_speedup=lambda: rate["bfloat16"] / rate["float32"])
    return {"encoder": encoder, "weights": weights, "batch_size": batch_size, "repeats": repeats, "cpu": _cpu(),
            "images_per_s": {n: round(v, 2) for n, v in rate.items()},
            "bfloat16_over_float32": round(rate["bfloat16"] / rate["float32"], 3),
            "cosine_computed": {"min": round(float(computed.min()), 6), "median": round(float(np.median(computed)), 6)},
            "cosine_stored": {"min": round(float(stored.min()), 6), "median": round(float(np.median(stored)), 6)},
            "auto": auto.precision, "probe_speedup": round(probe.speedup, 3), "probe_device": probe.device,
            "probe_seconds": round(probe.seconds, 2)}


def report(r: dict) -> None:
    rate = r["images_per_s"]
    print(f"{r['encoder']} ({r['weights']} weights), batch {r['batch_size']}, medians of {r['repeats']} on {r['cpu']}:")
    print(f"  float32  {rate['float32']:8.2f} images/s")
    print(f"  bfloat16 {rate['bfloat16']:8.2f} images/s: {r['bfloat16_over_float32']:.3f}x float32 (target >= 2.5 "
          "where the CPU has bfloat16 matrix units)")
    print(f"  cosine of bfloat16 to float32 features per image: min {r['cosine_computed']['min']:.6f}, median "
          f"{r['cosine_computed']['median']:.6f}; as stored (float16) min {r['cosine_stored']['min']:.6f} "
          "(target >= 0.999)")
    print(f"  --encoder-precision auto picks {r['auto']} here: its probe measured bfloat16 at "
          f"{r['probe_speedup']:.2f}x float32 on the {r['probe_device']} (in {r['probe_seconds']:.2f}s); where "
          f"that passes, the encoder's own speedup (above) decides")
    print("RESULT " + json.dumps(r), flush=True)


def main(argv=None):
    from model import backbones

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default=backbones.DEFAULT, choices=backbones.NAMES)
    ap.add_argument("--batch-size", type=int, default=16, help="images a call (preprocess's default batch)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls in each precision")
    ap.add_argument("--weights", default="random", help="random (seeded), imagenet, or a weights file")
    args = ap.parse_args(argv)
    report(measure(args.encoder, args.batch_size, args.repeats, args.weights))


if __name__ == "__main__":
    main()
