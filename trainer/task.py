"""Train the captioner on a data directory.

    python -m trainer.task --data DATA_DIR --job-dir JOB_DIR [--epochs E] [--batch-size B] ...

Stop it at any moment (Ctrl-C, SIGTERM, a preempted machine) and run the same
command again: it continues from its last checkpoint.
"""
from __future__ import annotations

import sys

from model import fused_attention
from caption_io import cli

from trainer import distribute, loop
from trainer.loop import Settings


def parse_args(argv) -> Settings:
    ap = cli.Parser(prog="python -m trainer.task", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="data directory from pipelines.preprocess (local or gs://)")
    ap.add_argument("--job-dir", required=True, help="where checkpoints, logs, metrics and the export go")
    ap.add_argument("--epochs", type=int, default=Settings.epochs)
    ap.add_argument("--batch-size", type=int, default=Settings.batch_size, help="global batch, over all replicas")
    ap.add_argument("--learning-rate", type=float, default=Settings.learning_rate)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default=Settings.lr_schedule)
    ap.add_argument("--warmup-steps", type=int, default=Settings.warmup_steps)
    ap.add_argument("--clip-norm", type=float, default=Settings.clip_norm, help="global gradient-norm clip")
    ap.add_argument("--embedding-dim", type=int, default=Settings.embedding_dim)
    ap.add_argument("--units", type=int, default=Settings.units)
    ap.add_argument("--dropout", type=float, default=Settings.dropout)
    ap.add_argument("--attention-reg", type=float, default=Settings.attention_reg,
                    help="lambda of the doubly stochastic attention regulariser (0: off)")
    ap.add_argument("--gate", action="store_true", help="the paper's gating scalar beta on the context")
    ap.add_argument("--mixed-precision", action="store_true", help="bfloat16 compute (GPU/AMX), float32 logits")
    ap.add_argument("--attention-kernel", choices=fused_attention.CHOICES, default=Settings.attention_kernel,
                    help="the time loop's attention on CPU: fused kernels built on first use, or TensorFlow ops "
                    "(auto: the kernels where they build; GPUs and bfloat16 use the ops)")
    ap.add_argument("--jit-compile", choices=loop.JIT_CHOICES, default=Settings.jit_compile,
                    help="XLA for the train step (auto: on with one GPU, off on CPUs; lengths are then "
                    "padded up to buckets, so it compiles a few times, not once per length)")
    ap.add_argument("--strategy", choices=distribute.CHOICES, default="auto")
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--shuffle-buffer", type=int, default=Settings.shuffle_buffer)
    ap.add_argument("--bucket-boundaries", default="", help="caption-length buckets, e.g. 12,16,20 (default: none)")
    ap.add_argument("--checkpoint-every", type=int, default=Settings.checkpoint_every, help="steps (0: epoch ends only)")
    ap.add_argument("--keep-checkpoints", type=int, default=Settings.keep_checkpoints)
    ap.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                    help="stop after this many epochs without a better val loss (0: off)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export at the end")
    ap.add_argument("--no-eval", dest="evaluate", action="store_false",
                    help="skip scoring the export on the val split with the COCO caption metrics (large sets)")
    ap.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    for flag, value, low in (("--epochs", a.epochs, 1), ("--batch-size", a.batch_size, 1), ("--units", a.units, 1),
                             ("--embedding-dim", a.embedding_dim, 1), ("--shuffle-buffer", a.shuffle_buffer, 1),
                             ("--keep-checkpoints", a.keep_checkpoints, 1), ("--checkpoint-every", a.checkpoint_every, 0),
                             ("--max-steps", a.max_steps, 0), ("--early-stopping", a.early_stopping, 0),
                             ("--warmup-steps", a.warmup_steps, 0)):
        if value < low:
            ap.error(f"{flag} must be at least {low}, got {value}")
    if a.learning_rate <= 0 or a.clip_norm <= 0:
        ap.error("--learning-rate and --clip-norm must be positive")
    if not 0 <= a.dropout < 1:
        ap.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.attention_reg < 0:
        ap.error(f"--attention-reg must be >= 0, got {a.attention_reg}")
    try:
        buckets = tuple(int(x) for x in a.bucket_boundaries.split(",") if x.strip())
    except ValueError:
        ap.error(f"--bucket-boundaries: expected integers like 12,16,20, got {a.bucket_boundaries!r}")
    if list(buckets) != sorted(set(buckets)) or any(b < 2 for b in buckets):
        ap.error(f"--bucket-boundaries must be increasing lengths >= 2, got {a.bucket_boundaries!r}")
    return Settings(data=a.data, job_dir=a.job_dir, epochs=a.epochs, batch_size=a.batch_size,
                    learning_rate=a.learning_rate, lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps,
                    clip_norm=a.clip_norm, embedding_dim=a.embedding_dim, units=a.units, dropout=a.dropout,
                    attention_reg=a.attention_reg, gate=a.gate, mixed_precision=a.mixed_precision,
                    attention_kernel=a.attention_kernel, jit_compile=a.jit_compile,
                    strategy=a.strategy, seed=a.seed, shuffle_buffer=a.shuffle_buffer, bucket_boundaries=buckets,
                    checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
                    early_stopping=a.early_stopping, max_steps=a.max_steps, validate=a.validate, progress=a.progress,
                    export=a.export, evaluate=a.evaluate)


def finish(trainer, settings):
    """After training: the chief alone exports the SavedModel and scores it on val
    (other workers of a multi-worker job return at once). -> the export path or None."""
    if not (settings.export and trainer.chief):
        return None
    from caption_serving import export

    from caption_io import fileio

    try:
        path = export.export(settings.job_dir)
    except fileio.WriteError as e:
        raise loop.TrainError(f"{e}; training is done and saved: free some space and run `python -m caption_serving.export "
                              f"--job-dir {settings.job_dir}` (or the same command again)") from None
    print(f"exported the SavedModel to {path}", file=sys.stderr)
    if settings.evaluate and "val" in trainer.meta["splits"]:
        from caption_eval import evaluate

        scores = evaluate.evaluate(path, settings.data, split="val")
        print(evaluate.table(scores))
    return path


def main(argv=None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    from caption_io import fileio
    from caption_io import vocab as vocab_lib

    from trainer import data
    from caption_eval import evaluate
    from caption_serving import export

    try:
        trainer = loop.Trainer(settings)
        metrics = trainer.run()
        finish(trainer, settings)
    except (data.DataError, loop.TrainError, vocab_lib.VocabError, export.ExportError, evaluate.UsageError,
            fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except evaluate.ScoringError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except loop.Interrupted as e:
        print(str(e), file=sys.stderr)
        return 143  # 128 + SIGTERM: stopped, not finished
    print(f"trained {metrics['steps']} steps ({metrics['stopped']}); final train loss "
          f"{metrics['final_train_loss']}, val loss {metrics['final_val_loss']}; {settings.job_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
