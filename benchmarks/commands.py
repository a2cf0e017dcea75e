"""Running the project's commands from a benchmark: each printed, timed, and skipped where its
last output is already there (so a long benchmark can be resumed)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], what: str) -> float:
    """Run `cmd` from the repository's root; exit with its last error lines if it fails. -> seconds."""
    print("$", shlex.join(cmd[1:]), file=sys.stderr, flush=True)
    began = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.time() - began


def step(done: str, cmd: list[str], what: str) -> float | None:
    """Run `cmd` unless `done` (a file it writes last) is there. -> its seconds, or None if reused."""
    return None if os.path.exists(done) else run(cmd, what)


# The demo's trainer flags, for benchmarks that train on the scene set as the demo does.
DEMO_FLAGS = ["--batch-size", "64", "--attention-reg", "0.1"]


def scene_job_parser(description: str, train: int, val: int) -> argparse.ArgumentParser:
    """The flags of a benchmark that generates a scene set and trains on it: --work, --train, --val,
    --seed, --epochs, and trainer flags after `--` (see trainer_flags)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--work", required=True, help="where the scene sets, data and jobs go (kept: reused)")
    ap.add_argument("--train", type=int, default=train, help=f"training pictures (default {train})")
    ap.add_argument("--val", type=int, default=val, help=f"val pictures (default {val})")
    ap.add_argument("--seed", type=int, default=0, help="the scene set's seed (default 0)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of every job (default 6)")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then trainer flags for every job (default: the demo's)")
    return ap


def trainer_flags(args: argparse.Namespace) -> list[str]:
    """The trainer flags given after `--`, else the demo's."""
    return [f for f in args.flags if f != "--"] or DEMO_FLAGS


def preprocess_and_train(coco: str, data: str, job: str, what: str, preprocess_flags: list[str],
                         train_flags: list[str]) -> tuple[float | None, float | None, dict]:
    """The scene set `coco` through the pipeline into `data` (the random-weight encoder, 4 train
    shards), then a job trained on it in `job`, which the trainer exports and evaluates on val; each
    skipped where it has finished. -> (seconds preprocessing, seconds training, eval-val/metrics.json)."""
    py = sys.executable
    preprocess = step(os.path.join(data, "metadata.json"),
                      [py, "-m", "pipelines.preprocess", "--coco-dir", coco, "--output", data, "--encoder-weights",
                       "random", "--seed", "0", "--num-shards", "train=4,val=1", "--overwrite", *preprocess_flags],
                      f"{what}: preprocessing")
    metrics = os.path.join(job, "eval-val", "metrics.json")
    train = step(metrics, [py, "-m", "trainer.task", "--data", data, "--job-dir", job, "--no-progress", *train_flags],
                 f"{what}: training")
    with open(metrics) as f:
        return preprocess, train, json.load(f)
