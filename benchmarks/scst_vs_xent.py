"""Self-critical training against more cross-entropy for the same training time, in one run.

    python -m benchmarks.scst_vs_xent --job JOB --work DIR [--scst-epochs 2] [--scst-learning-rate LR]
                                      [--scst-baseline mean] [--beam-size 3] [-- trainer flags]

JOB is a finished cross-entropy job (e.g. `make demo`'s demo_out/job, with its data next to it as
job.json records). It is copied twice under DIR and both copies go on from its newest checkpoint:
  scst:  `python -m trainer.task ... --epochs E --scst-epochs S` (E: the epochs JOB did), then
  xent:  `python -m trainer.task ... --epochs E+1`, then one more call to the epoch count whose
         training seconds (history.json's epoch_seconds: stepping only, not validation nor the
         per-epoch caption metrics) reach the SCST run's, going on if they fall short;
and the start, the SCST run and the cross-entropy checkpoint whose training time is nearest the
SCST run's are each exported and evaluated with beam search on the val split by
caption_eval.evaluate (BLEU-4, CIDEr, and on the scene set the exact-objects share by object
count). The trainer flags after `--` go to both runs (the job's model flags must be repeated,
e.g. `-- --batch-size 64 --attention-reg 0.1`). Prints one RESULT line of JSON and a table, with
the SCST run's CIDEr over the cross-entropy run's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from caption_io import decoding_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(data: str, job: str, flags: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "trainer.task", "--data", data, "--job-dir", job, "--no-progress",
           "--export", "none", "--checkpoint-every", "0", "--keep-checkpoints", "50", *flags]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"training failed ({proc.returncode}): {proc.stderr[-2000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("epoch "):
            print("   ", line[:220], file=sys.stderr, flush=True)
    with open(os.path.join(job, "history.json")) as f:
        return json.load(f)


def _score(job: str, checkpoint: str, name: str, beam_size: int) -> dict:
    """Export `checkpoint` of `job` and evaluate it on val -> the figures compared."""
    from caption_eval import evaluate
    from caption_serving import export

    model = export.export(job, os.path.join(job, f"export-{name}"), checkpoint=checkpoint)
    m = evaluate.evaluate(model, split="val", beam_size=beam_size, output=os.path.join(job, f"eval-{name}"),
                          gallery_size=0)
    objects = m.get("exact_objects") or {}
    return {"checkpoint": os.path.basename(checkpoint), "BLEU-4": m["BLEU-4"], "CIDEr": m["CIDEr"],
            "METEOR": m["METEOR"],
            "exact_objects": {k: v["share"] for k, v in objects.items()}}


def _checkpoint_at(job: str, step: int) -> str:
    path = os.path.join(job, "checkpoints", f"ckpt-{step}")
    if not os.path.exists(path + ".index"):
        sys.exit(f"{job}: no checkpoint at step {step} (raise --keep-checkpoints?)")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", required=True, help="a finished cross-entropy job directory")
    ap.add_argument("--work", required=True, help="where the two copies go (must not exist)")
    ap.add_argument("--scst-epochs", type=int, default=2)
    ap.add_argument("--scst-learning-rate", type=float, default=None)
    ap.add_argument("--scst-baseline", default="mean", choices=("mean", "greedy"))
    ap.add_argument("--beam-size", type=int, default=decoding_defaults.BEAM_SIZE)
    ap.add_argument("--max-xent-epochs", type=int, default=30, help="the most cross-entropy epochs added")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then trainer flags for both runs")
    a = ap.parse_args(argv)
    flags = [f for f in a.flags if f != "--"]
    if os.path.exists(a.work):
        ap.error(f"--work {a.work}: exists; give a new folder")
    with open(os.path.join(a.job, "job.json")) as f:
        recorded = json.load(f)
    from caption_io import jobdir

    data = jobdir.recorded_data(recorded, os.path.join(a.job, "job.json"), a.job)
    with open(os.path.join(a.job, "history.json")) as f:
        start = json.load(f)
    epochs = len(start)
    if not epochs or any(h.get("stage") == "scst" for h in start):
        ap.error(f"--job {a.job}: wants a job of cross-entropy epochs only")
    os.makedirs(a.work)
    jobs = {name: os.path.join(a.work, name) for name in ("scst", "xent")}
    for job in jobs.values():
        shutil.copytree(a.job, job, ignore=shutil.ignore_patterns("export*", "eval-*", "logs"))

    scst_flags = ["--epochs", str(epochs), "--scst-epochs", str(a.scst_epochs), "--scst-baseline", a.scst_baseline]
    if a.scst_learning_rate:
        scst_flags += ["--scst-learning-rate", str(a.scst_learning_rate)]
    began = time.time()
    scst_history = _train(data, jobs["scst"], flags + scst_flags)[epochs:]
    scst_seconds = sum(h["epoch_seconds"] for h in scst_history)
    print(f"SCST: {a.scst_epochs} epochs, {scst_seconds:.0f} s training ({time.time() - began:.0f} s wall)",
          file=sys.stderr)

    # One epoch first, for its time; then the epochs that time says are left, in one more run (each
    # run traces its step once, as the SCST run did).
    xent_history, seconds = [], 0.0
    while seconds < scst_seconds and len(xent_history) < a.max_xent_epochs:
        more = 1 if not xent_history else math.ceil((scst_seconds - seconds) / xent_history[-1]["epoch_seconds"])
        target = epochs + min(len(xent_history) + more, a.max_xent_epochs)
        xent_history = _train(data, jobs["xent"], flags + ["--epochs", str(target)])[epochs:]
        seconds = sum(h["epoch_seconds"] for h in xent_history)
    cumulative = [sum(h["epoch_seconds"] for h in xent_history[:i + 1]) for i in range(len(xent_history))]
    nearest = min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - scst_seconds))

    results = {
        "start": dict(_score(jobs["xent"], _checkpoint_at(jobs["xent"], start[-1]["step"]), "start", a.beam_size),
                      epochs=epochs),
        "xent": dict(_score(jobs["xent"], _checkpoint_at(jobs["xent"], xent_history[nearest]["step"]), "xent",
                            a.beam_size), epochs_added=nearest + 1, train_seconds=cumulative[nearest]),
        "scst": dict(_score(jobs["scst"], _checkpoint_at(jobs["scst"], scst_history[-1]["step"]), "scst",
                            a.beam_size), scst_epochs=a.scst_epochs, train_seconds=scst_seconds,
                     reward_share=sum(h["reward_share"] * h["epoch_seconds"] for h in scst_history) / scst_seconds,
                     sampled_tokens_per_s=sum(h["tokens_per_s"] * h["epoch_seconds"] for h in scst_history)
                     / scst_seconds,
                     learning_rate=a.scst_learning_rate, baseline=a.scst_baseline),
    }
    results["cider_ratio_scst_over_xent"] = results["scst"]["CIDEr"] / results["xent"]["CIDEr"]
    results["val_greedy_cider_per_epoch"] = {
        "xent": [round(h.get("val_CIDEr", float("nan")), 3) for h in xent_history],
        "scst": [round(h.get("val_CIDEr", float("nan")), 3) for h in scst_history]}
    print("RESULT " + json.dumps(results))
    counts = sorted(k for k in results["start"]["exact_objects"] if k != "all")
    print(f"\n{'':38} {'BLEU-4':>7} {'CIDEr':>7} " + " ".join(f"{'exact ' + k:>8}" for k in counts + ["all"]))
    for name, label in (("start", f"after {epochs} cross-entropy epochs"),
                        ("xent", f"+{nearest + 1} cross-entropy epochs ({cumulative[nearest]:.0f} s)"),
                        ("scst", f"+{a.scst_epochs} SCST epochs ({scst_seconds:.0f} s)")):
        r = results[name]
        print(f"{label:38} {r['BLEU-4']:7.3f} {r['CIDEr']:7.3f} "
              + " ".join(f"{r['exact_objects'].get(k, float('nan')):8.3f}" for k in counts + ["all"]))
    print(f"SCST CIDEr / cross-entropy CIDEr at the same training time: {results['cider_ratio_scst_over_xent']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
