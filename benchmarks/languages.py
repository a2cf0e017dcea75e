"""Languages and tokenizers, in one run: the same scene pictures captioned in English and in
Chinese, and English with a word vocabulary and with WordPiece, each preprocessed, trained and
evaluated at the same settings.

    python -m benchmarks.languages --work DIR [--train 1000] [--val 300] [--epochs 6] [-- trainer flags]

Three data sets of the same pictures (`pipelines.synthetic --seed S` draws the same scenes in
either language): en (--tokenizer words), zh (--tokenizer words: Chinese is characters in every
mode) and en-wordpiece (--tokenizer wordpiece). Each is trained by the trainer with the demo's
flags (--batch-size 64 --attention-reg 0.1, or those after `--`) for --epochs epochs and
evaluated by it (beam search, the val split: eval-val/metrics.json). Finished steps are reused, so
a run can be resumed. Prints one RESULT line of JSON and a table: CIDEr (zh: over characters),
BLEU-4, exact objects on one-object scenes and over all, and the vocabulary's size.

The targets: zh's exact objects on one-object scenes within 0.05 of en's, and
en-wordpiece's CIDEr within 5% of en's.
"""
from __future__ import annotations

import json
import os
import shlex
import sys

from benchmarks.commands import preprocess_and_train, scene_job_parser, step, trainer_flags

# name -> (the captions' language, --tokenizer)
RUNS = {"en": ("en", "words"), "zh": ("zh", "words"), "en-wordpiece": ("en", "wordpiece")}


def run_one(work: str, name: str, a) -> dict:
    language, mode = RUNS[name]
    coco, data, job = (os.path.join(work, p) for p in (f"scenes-{language}", f"data-{name}", f"job-{name}"))
    py = sys.executable
    step(os.path.join(coco, "annotations", "instances_val2014.json"),
          [py, "-m", "pipelines.synthetic", "--output", coco, "--train", str(a.train), "--val", str(a.val),
           "--seed", str(a.seed), "--language", language], f"{name}: the scene set")
    preprocess, train, m = preprocess_and_train(coco, data, job, name, ["--tokenizer", mode],
                                                ["--epochs", str(a.epochs), *a.trainer_flags])
    with open(os.path.join(data, "metadata.json")) as f:
        vocab_size = json.load(f)["vocab"]["size"]
    exact = m["exact_objects"]
    return {"language": language, "tokenizer": mode, "CIDEr": m["CIDEr"], "BLEU-4": m["BLEU-4"],
            "exact_1": exact["1"]["share"], "exact_1_images": exact["1"]["images"],
            "exact_all": exact["all"]["share"], "vocab_size": vocab_size,
            "preprocess_s": preprocess, "train_s": train}


def main(argv=None) -> int:
    ap = scene_job_parser(__doc__.split("\n\n")[0], train=1000, val=300)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)} (default all)")
    a = ap.parse_args(argv)
    a.trainer_flags = trainer_flags(a)
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {', '.join(unknown)} (the runs are {', '.join(RUNS)})")
    os.makedirs(a.work, exist_ok=True)
    results = {name: run_one(a.work, name, a) for name in names}
    print("RESULT " + json.dumps(results))
    print(f"\n{a.train} training and {a.val} val pictures, {a.epochs} epochs, "
          f"trainer flags {shlex.join(a.trainer_flags)}; beam search on val")
    head = ["CIDEr", "BLEU-4", "exact 1-obj", "exact all", "vocab"]
    print(f"{'':14} " + " ".join(f"{h:>11}" for h in head))
    for name, r in results.items():
        print(f"{name:14} {r['CIDEr']:11.3f} {r['BLEU-4']:11.3f} {r['exact_1']:11.3f} {r['exact_all']:11.3f} "
              f"{r['vocab_size']:11d}")
    if "en" in results and "zh" in results:
        print(f"zh - en, exact objects on one-object scenes: {results['zh']['exact_1'] - results['en']['exact_1']:+.3f}"
              " (target: within 0.05)")
    if "en" in results and "en-wordpiece" in results:
        ratio = results["en-wordpiece"]["CIDEr"] / results["en"]["CIDEr"]
        print(f"en-wordpiece / en, CIDEr: {ratio:.3f} (target: within 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
