"""Train the captioner on a data directory.

    python -m trainer.task --data DATA_DIR --job-dir JOB_DIR [--epochs E] [--batch-size B] ...

Stop it at any moment (Ctrl-C, SIGTERM, a preempted machine) and run the same
command again: it continues from its last checkpoint.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before TensorFlow is imported, below
    from caption_io import quiet

    quiet.install()

import sys

from caption_io import cli
from trainer import loop
from trainer import settings as settings_lib
from trainer.settings import Settings


def parse_args(argv) -> Settings:
    """The flags are made from the Settings' declaration (trainer/settings.py), and a setting
    out of bounds is one error line, exit 2."""
    ap = cli.Parser(prog="python -m trainer.task", description=__doc__.split("\n\n")[0])
    settings_lib.add_flags(ap)
    try:
        return settings_lib.from_args(ap.parse_args(argv))
    except settings_lib.SettingsError as e:
        ap.error(str(e))


def finish(trainer, settings):
    """After training: the chief alone exports the SavedModel (of the newest checkpoint, or with
    --export best of checkpoints/best) and scores it on val (other workers of a multi-worker
    job return at once). -> the export path or None."""
    if settings.export == "none" or not trainer.chief:
        return None
    from caption_io import fileio
    from caption_serving import export

    try:
        path = export.export(settings.job_dir, checkpoint=settings.export)
    except fileio.WriteError as e:
        raise loop.TrainError(f"{e}; training is done and saved: free some space and run "
                              f"`python -m caption_serving.export --job-dir {settings.job_dir} "
                              f"--checkpoint {settings.export}` (or the same command again)") from None
    print(f"exported the SavedModel of the {settings.export} checkpoint to {path}", file=sys.stderr)
    if settings.evaluate and "val" in trainer.meta.splits:
        from caption_eval import evaluate

        scores = evaluate.evaluate(path, settings.data, split="val")
        print(evaluate.table(scores))
    return path


@cli.command(interrupted="interrupted; run the same command again: it continues from its last checkpoint")
def main(argv=None) -> int:
    """Errors a user can fix end as one line through cli.command (most exit 2; a scorer that
    cannot run, 1); a SIGTERM stop prints where it saved and exits 143. The last line names
    only the losses that exist: none before an epoch has completed (--max-steps mid-epoch),
    no val loss with validation off."""
    settings = parse_args(argv)
    try:
        trainer = loop.Trainer(settings)
        metrics = trainer.run()
        finish(trainer, settings)
    except loop.Interrupted as e:
        print(str(e), file=sys.stderr)
        return 143  # 128 + SIGTERM: stopped, not finished
    train, val = metrics.get("final_train_loss"), metrics.get("final_val_loss")
    losses = ("no epoch completed, so no epoch loss yet" if train is None else
              f"final train loss {train:.4f}" + (f", val loss {val:.4f}" if val is not None else ""))
    if metrics.get("final_train_reward") is not None:
        losses += f"; {metrics['scst_steps']} SCST steps, final sample reward {metrics['final_train_reward']:.3f}"
    print(f"trained {metrics['steps']} steps ({metrics['stopped']}); {losses}; {settings.job_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
