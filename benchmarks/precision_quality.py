"""bfloat16 against float32 from end to end, in one run: the same scene set preprocessed with the
encoder in each precision, trained in each (same seed, same epochs), exported and evaluated.

    python -m benchmarks.precision_quality --work DIR [--train 3000] [--val 200] [--epochs 6]
        [--encoder inception_v3] [-- trainer flags]

float32: `pipelines.preprocess --encoder-precision float32`, `trainer.task --precision float32`;
bfloat16: `--encoder-precision bfloat16` and `--precision bfloat16`. Both jobs use the demo's
flags (--batch-size 64 --attention-reg 0.1, or those after `--`) and are evaluated by the trainer
(the SavedModel's beam-search captions of the val split: eval-val/). Finished steps are reused.
Prints one RESULT line of JSON and a table: CIDEr and BLEU-4 of each, the share of val images
whose captions are the same word for word, and each stage's wall time.

Then the SavedModel alone: the float32 job's export captions the val pictures from their files
(`pipelines.caption_images`, beam 3) with its encoder computing in each precision
(--encoder-precision), so the two caption sets come from the same trained weights and differ only
by the encoder's rounding; their CIDEr against the references and their agreement, image by image.

The targets: bfloat16's CIDEr within 2% of float32's, and the SavedModel's captions the same in
both precisions on at least 95% of the val images (two retrained models differ more than that even
in one precision: a change of seed). The times are the stages' own (a CPU without bfloat16 matrix units emulates it).
--encoder picks the backbone (random weights; another than InceptionV3 gets its own data and job
folders, named after it).
"""
from __future__ import annotations

import collections
import json
import os
import shlex
import sys

from benchmarks.commands import preprocess_and_train, scene_job_parser, step, trainer_flags
from caption_eval.evaluators import coco_metrics
from model import backbones

PRECISIONS = ("float32", "bfloat16")


def tag(encoder: str, precision: str) -> str:
    """A run's name in its data and job folders: the precision, after the encoder unless InceptionV3."""
    return precision if encoder == backbones.DEFAULT else f"{encoder}-{precision}"


def run_one(work: str, coco: str, precision: str, a) -> dict:
    name = tag(a.encoder, precision)
    data, job = (os.path.join(work, f"{p}-{name}") for p in ("data", "job"))
    preprocess, train, m = preprocess_and_train(
        coco, data, job, name, ["--encoder", a.encoder, "--encoder-precision", precision],
        ["--epochs", str(a.epochs), "--precision", precision, *a.trainer_flags])
    with open(os.path.join(job, "eval-val", "results.json")) as f:
        captions = {r["image_id"]: r["caption"] for r in json.load(f)}
    with open(os.path.join(job, "metrics.json")) as f:
        trained = json.load(f)
    return {"CIDEr": m["CIDEr"], "BLEU-4": m["BLEU-4"], "captions": captions, "preprocess_s": preprocess,
            "train_s": train, "train_wall_s": trained["wall_seconds"], "precision": trained["precision"],
            "attention_kernel": trained["attention_kernel"]}


def serve(work: str, coco: str, name: str, encoder: str) -> dict:
    """The export of job `name` captioning the val pictures with its encoder in `encoder` precision."""
    out = os.path.join(work, f"serve-{name}-encoder-{encoder}")
    seconds = step(os.path.join(out, "summary.json"),
                   [sys.executable, "-m", "pipelines.caption_images", "--images", os.path.join(coco, "val2014"),
                    "--model", os.path.join(work, f"job-{name}", "export"), "--output", out, "--coco-results",
                    "--overwrite", "--encoder-precision", encoder],
                   f"the {name} export, encoder in {encoder}: captioning val")
    with open(os.path.join(out, "coco_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(coco, "annotations", "captions_val2014.json")) as f:
        references = collections.defaultdict(list)
        for ann in json.load(f)["annotations"]:
            references[ann["image_id"]].append(ann["caption"])
    m = coco_metrics.score(results, dict(references))
    return {"CIDEr": m["CIDEr"], "BLEU-4": m["BLEU-4"], "caption_s": seconds,
            "captions": {r["image_id"]: r["caption"] for r in results}}


def compare(results: dict) -> dict:
    """bfloat16's CIDEr over float32's, and the share of images captioned the same in both."""
    a, b = results["float32"], results["bfloat16"]
    shared = sorted(set(a["captions"]) & set(b["captions"]))
    same = sum(a["captions"][i] == b["captions"][i] for i in shared)
    return {"cider_ratio": b["CIDEr"] / a["CIDEr"], "same_captions": same, "images": len(shared),
            "agreement": same / max(len(shared), 1)}


def main(argv=None) -> int:
    ap = scene_job_parser(__doc__.split("\n\n")[0], train=3000, val=200)
    ap.add_argument("--encoder", default=backbones.DEFAULT, choices=backbones.NAMES,
                    help=f"the backbone, with random weights (default {backbones.DEFAULT})")
    a = ap.parse_args(argv)
    a.trainer_flags = trainer_flags(a)
    os.makedirs(a.work, exist_ok=True)
    coco = os.path.join(a.work, "scenes")
    step(os.path.join(coco, "annotations", "instances_val2014.json"),
         [sys.executable, "-m", "pipelines.synthetic", "--output", coco, "--train", str(a.train), "--val",
          str(a.val), "--seed", str(a.seed)], "the scene set")
    results = {p: run_one(a.work, coco, p, a) for p in PRECISIONS}
    summary = compare(results)
    served = {p: serve(a.work, coco, tag(a.encoder, "float32"), p) for p in PRECISIONS}
    serving = compare(served)

    def figures(runs):
        return {p: {k: v for k, v in r.items() if k != "captions"} for p, r in runs.items()}

    print("RESULT " + json.dumps({"runs": figures(results), **summary,
                                  "savedmodel": {"runs": figures(served), **serving}}))
    print(f"\n{a.train} training and {a.val} val pictures, encoder {a.encoder}, {a.epochs} epochs, trainer flags "
          f"{shlex.join(a.trainer_flags)}; beam search on val")
    print(f"{'':9} {'CIDEr':>7} {'BLEU-4':>7} {'preprocess s':>13} {'train+eval s':>13}  attention")
    for p, r in results.items():
        times = [f"{t:13.0f}" if t is not None else f"{'(reused)':>13}" for t in (r["preprocess_s"], r["train_s"])]
        print(f"{p:9} {r['CIDEr']:7.3f} {r['BLEU-4']:7.3f} {times[0]} {times[1]}  {r['attention_kernel']}")
    print(f"bfloat16 / float32, CIDEr: {summary['cider_ratio']:.3f} (target: within 2%)")
    print(f"the same caption: {summary['same_captions']} of {summary['images']} val images "
          f"({100 * summary['agreement']:.1f}%)")
    print("\nthe float32 job's SavedModel, captioning the val files, its encoder in:")
    for p, r in served.items():
        print(f"{p:9} {r['CIDEr']:7.3f} {r['BLEU-4']:7.3f}")
    print(f"bfloat16 / float32, CIDEr: {serving['cider_ratio']:.3f}; the same caption: {serving['same_captions']} "
          f"of {serving['images']} val images ({100 * serving['agreement']:.1f}%, target 95%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
