"""Composition and variety, in one run: captioners trained on a scene set with held-out pairs,
scored on the val scenes that hold a never-seen (colour, shape) pair and on the rest; then
self-critical training with a sweep of --scst-xent-weight, scored for CIDEr and variety.

    python -m pipelines.synthetic --output DIR/coco --train 3000 --val 200 --seed 0 --novel-pairs 3
    python -m pipelines.preprocess --coco-dir DIR/coco --output DIR/data --encoder-weights random \\
        --seed 0 --num-shards train=4,val=1
    python -m benchmarks.generalisation --data DIR/data --work DIR/jobs [--epochs 6] \\
        [--variant NAME=FLAGS ...] [--scst-weights 0,0.5,1] [--scst-from base] [-- trainer flags]

Each --variant (default: base, with no flags of its own) is a cross-entropy job DIR/jobs/NAME of
--epochs epochs with the common trainer flags after `--` (default: the demo's, --batch-size 64
--attention-reg 0.1) and its own, e.g. `--variant "wd=--word-dropout 0.3"` or
`--variant "tf=--decoder transformer"`. The SCST sweep copies the --scst-from job once per weight
W into DIR/jobs/scst-W and adds one SCST epoch with --scst-xent-weight W. Every job is exported
and evaluated by the trainer itself (beam search, the val split: eval-val/metrics.json); a job
whose evaluation is already there is read, not trained again, so a run can be resumed or
extended.

Before the jobs, a probe asks whether the stored features can tell shapes apart at all across
colours: a linear classifier of an object's shape from the features of the cells its box covers
(box-weighted mean), trained on the training scenes' objects, scored on the val objects of a
held-out pair and on the others. A decoder cannot name what the features do not separate.
Prints one RESULT line of JSON and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from benchmarks.commands import trainer_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(data: str, job: str, flags: list[str]) -> dict:
    """Train (unless done), and -> the figures of the job's own evaluation."""
    metrics_path = os.path.join(job, "eval-val", "metrics.json")
    if not os.path.exists(metrics_path):
        cmd = [sys.executable, "-m", "trainer.task", "--data", data, "--job-dir", job, "--no-progress", *flags]
        print("$", shlex.join(cmd[1:]), file=sys.stderr, flush=True)
        began = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"{job}: training failed ({proc.returncode}): {proc.stderr[-2000:]}")
        print(f"    {time.time() - began:.0f} s", file=sys.stderr, flush=True)
    with open(metrics_path) as f:
        return figures(json.load(f))


def figures(m: dict) -> dict:
    """The compared figures of an evaluation's metrics.json."""
    novel, variety = m.get("novel_pairs"), m["variety"]
    if not novel:
        sys.exit(f"{m['model']}: no novel-pair figures (make the scene set with --novel-pairs)")
    return {"CIDEr": m["CIDEr"], "BLEU-4": m["BLEU-4"], "exact": m["exact_objects"]["all"]["share"],
            "exact_novel": novel["novel"]["exact_objects"], "exact_seen": novel["seen"]["exact_objects"],
            "CIDEr_novel": novel["novel"]["CIDEr"], "CIDEr_seen": novel["seen"]["CIDEr"],
            "attention_novel": novel["novel"]["attention_ratio"], "attention_seen": novel["seen"]["attention_ratio"],
            "distinct": variety["distinct_captions"], "openings": variety["openings"],
            "vocabulary": variety["vocabulary"], "says_where": variety.get("says_where"),
            "top_opening": variety["top_openings"][0] if variety["top_openings"] else None,
            "novel_pairs": novel["pairs"]}


def shape_probe(data: str, epochs: int = 20) -> dict:
    """The linear shape probe of the module docstring -> {"novel": accuracy, "seen": accuracy, counts}."""
    import keras
    import numpy as np

    from caption_eval import evaluate
    from caption_eval.evaluators import attention
    from caption_io import metadata, records, scenes

    meta = metadata.read(data)

    def objects(split):
        _, boxes = evaluate.split_boxes(meta, split)
        if not boxes:
            sys.exit(f"--data {data}: no object boxes for the {split} split")
        held = set(boxes["novel_pairs"] or ())
        x, y, novel = [], [], []
        for r in records.read_records(metadata.shard_files(data, split, meta)):
            image = boxes["images"][r["image_id"]]
            features = r["features"].astype(np.float32)
            for o in image["objects"]:
                cover = attention.cell_coverage(o["bbox"], image["width"], image["height"])
                x.append(cover @ features / cover.sum())
                y.append(scenes.SHAPES.index(o["name"]))
                novel.append((o["colour"], o["name"]) in held)
        return np.stack(x), np.array(y), np.array(novel)

    x, y, _ = objects("train")
    xv, yv, nv = objects("val")
    mean, std = x.mean(0), x.std(0) + 1e-6
    keras.utils.set_random_seed(0)
    probe = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(len(scenes.SHAPES), activation="softmax")])
    probe.compile("adam", "sparse_categorical_crossentropy")
    probe.fit((x - mean) / std, y, epochs=epochs, batch_size=64, verbose=0)
    right = probe.predict((xv - mean) / std, verbose=0).argmax(1) == yv
    return {"novel": float(right[nv].mean()) if nv.any() else None, "seen": float(right[~nv].mean()),
            "novel_objects": int(nv.sum()), "seen_objects": int((~nv).sum())}


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    if not name or "/" in name or name.startswith("scst-"):
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS (a plain NAME, not scst-*), got {text!r}")
    return name, shlex.split(flags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a data directory of a scene set made with --novel-pairs")
    ap.add_argument("--work", required=True, help="where the jobs go (kept: finished jobs are reused)")
    ap.add_argument("--epochs", type=int, default=6, help="cross-entropy epochs of every job (default 6)")
    ap.add_argument("--variant", type=_variant, action="append", metavar="NAME=FLAGS",
                    help="a cross-entropy job with these trainer flags (repeatable; default: base=)")
    ap.add_argument("--scst-weights", default="", help="comma-separated --scst-xent-weight values (default: none)")
    ap.add_argument("--scst-from", default="base", help="the variant SCST continues from (default base)")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then trainer flags for every job")
    a = ap.parse_args(argv)
    common = trainer_flags(a)
    variants = dict(a.variant or [("base", [])])
    weights = [float(w) for w in a.scst_weights.split(",") if w.strip()]
    if weights and a.scst_from not in variants:
        ap.error(f"--scst-from {a.scst_from}: not one of the variants ({', '.join(variants)})")

    probe = shape_probe(a.data)
    print(f"shape probe: {probe}", file=sys.stderr, flush=True)
    results = {}
    for name, flags in variants.items():
        results[name] = dict(_job(a.data, os.path.join(a.work, name), common + ["--epochs", str(a.epochs), *flags]),
                             flags=shlex.join(flags))
    for w in weights:
        name, source = f"scst-{w:g}", os.path.join(a.work, a.scst_from)
        job = os.path.join(a.work, name)
        if not os.path.exists(os.path.join(job, "eval-val", "metrics.json")):
            shutil.rmtree(job, ignore_errors=True)
            shutil.copytree(source, job, ignore=shutil.ignore_patterns("export*", "eval-*", "logs"))
        flags = common + variants[a.scst_from] + ["--epochs", str(a.epochs), "--scst-epochs", "1",
                                                  "--scst-xent-weight", str(w)]
        results[name] = dict(_job(a.data, job, flags), flags=f"{a.scst_from} + 1 SCST epoch, W {w:g}")

    print("RESULT " + json.dumps({"shape_probe": probe, "jobs": results}))
    pairs = ", ".join(" ".join(p) for p in next(iter(results.values()))["novel_pairs"])
    print(f"\nheld-out pairs: {pairs}; beam search on the val split")
    print(f"linear shape probe on an object's cells: {probe['seen']:.3f} right on seen-pair objects, "
          f"{probe['novel']:.3f} on novel-pair objects")
    head = ["exact novel", "exact seen", "CIDEr", "CIDEr novel", "distinct", "openings", "says where"]
    print(f"{'':10} " + " ".join(f"{h:>11}" for h in head) + "  flags")
    for name, r in results.items():
        row = [r["exact_novel"], r["exact_seen"], r["CIDEr"], r["CIDEr_novel"], r["distinct"]]
        print(f"{name:10} " + " ".join(f"{v:11.3f}" for v in row) + f" {r['openings']:11d}"
              + f" {r['says_where'] if r['says_where'] is not None else float('nan'):11.3f}  {r['flags']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
