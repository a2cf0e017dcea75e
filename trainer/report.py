"""What a job says and writes about itself, apart from its checkpoints: the epoch's line on
stderr, and the job files (caption_io/jobdir.py names them): config.json and job.json at the
start, initial_val.json, history.json after each epoch, and at the end metrics.json, the loss
plot and final/ (the weights for export).

Only the chief writes them; the loop decides when.
"""
from __future__ import annotations

from caption_io import fileio, jobdir
from caption_io.jobdir import CONFIG_FILE
from model import fused_attention


def epoch_line(record: dict, epochs: int) -> str:
    """The epoch's line on stderr: losses, CIDEr, speed, and where its time went."""
    if record.get("stage") == "scst":
        line = (f"epoch {record['epoch']}/{epochs} (SCST): sample reward {record['train_reward']:.3f} (baseline "
                f"{record['train_baseline']:.3f}, {record['sample_length']:.1f} tokens a sample, scoring "
                f"{100 * record['reward_share']:.1f}% of the time)")
    else:
        line = (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
                f"(cross-entropy {record['train_xent']:.4f})")
    if "val_loss" in record:
        line += f", val loss {record['val_loss']:.4f} (cross-entropy {record['val_xent']:.4f})"
    if "val_CIDEr" in record:
        line += f", val CIDEr {record['val_CIDEr']:.3f} (BLEU-4 {record['val_BLEU-4']:.3f})"
    line += f", {record['tokens_per_s']:,.0f} tokens/s; {record['epoch_seconds']:.1f} s training"
    if "val_seconds" in record:
        line += f", {record['val_seconds']:.1f} s val loss"
    if "eval_seconds" in record:
        line += f", {record['eval_seconds']:.1f} s caption metrics ({record['eval_images']} images)"
    return line


def write_loss_plot(history: list[dict], path: str) -> None:
    """Loss per epoch, as the tutorial plots it, and the cross-entropy beside it
    (the attention regulariser gives the loss a floor of its own)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "loss per token"), (axes[1], "xent", "cross-entropy per token")):
        for split, label in (("train", "train"), ("val", "validation")):
            points = [(h["epoch"], h[f"{split}_{key}"]) for h in history if f"{split}_{key}" in h]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fileio.write_bytes(path, buf.getvalue())


def write_job(s, config, encoder) -> None:
    """config.json (what rebuilds the model) and job.json (the settings, the data directory
    absolutely and relative to the job, and the encoder that made its features: metadata.json's
    record, which a resumed job and an export check their data against)."""
    fileio.write_text(fileio.join(s.job_dir, CONFIG_FILE), config.to_json())
    record = dict(s.to_dict(), job_dir=fileio.absolute(s.job_dir), **{jobdir.JOB_ENCODER: encoder.to_dict()})
    fileio.write_json(fileio.join(s.job_dir, jobdir.JOB_FILE), jobdir.record_data(record, s.data, s.job_dir))


def read_history(job_dir: str, epochs_done: int) -> list[dict]:
    """history.json's records of the epochs a restored checkpoint has done. Epochs past it (written
    before a save that did not happen, or kept by a newer checkpoint that was damaged) are trained
    again: their records go, to come again."""
    path = fileio.join(job_dir, jobdir.HISTORY_FILE)
    history = fileio.read_json(path) if fileio.exists(path) else []
    return [h for h in history if h["epoch"] <= epochs_done]


def write_history(job_dir: str, history: list[dict]) -> None:
    fileio.write_json(fileio.join(job_dir, jobdir.HISTORY_FILE), history)


def initial_val_path(job_dir: str) -> str:
    """Where the val loss started (the yardstick for "learned" in metrics.json)."""
    return fileio.join(job_dir, jobdir.INITIAL_VAL_FILE)


def final_metrics(history: list[dict], *, steps: int, epochs_completed: int, scst_steps: int, best_loss, best_cider,
                  metric: str, initial_val: dict | None, reason: str, seconds: float, tokens: int, replicas: int,
                  fused: bool, jit_compile: bool, precision) -> dict:
    """metrics.json: where the job ended, its best and final figures, and this run's speed and how it
    ran (precision: trainer/precision.py's Choice)."""
    last = history[-1] if history else {}
    xent = [h for h in history if "train_loss" in h]
    return {"steps": steps, "epochs_completed": epochs_completed,
            "final_train_loss": xent[-1]["train_loss"] if xent else None, "final_val_loss": last.get("val_loss"),
            "final_train_reward": last.get("train_reward"), "scst_steps": scst_steps,
            "best_val_loss": best_loss, "best_val_cider": best_cider, "early_stopping_metric": metric,
            "initial_val_loss": (initial_val or {}).get("loss"), "initial_val_xent": (initial_val or {}).get("xent"),
            "stopped": reason, "wall_seconds": round(seconds, 2),
            "tokens_per_s_this_run": round(tokens / max(seconds, 1e-9), 1), "replicas": replicas,
            "attention_kernel": "fused" if fused else "ops",
            "attention_kernel_build": fused_attention.loaded_build() if fused else None,
            "jit_compile": jit_compile, "precision": precision.to_dict(), "history": history}


def write_final(job_dir: str, metrics: dict) -> None:
    """metrics.json, and the loss plot once an epoch is recorded."""
    fileio.write_json(fileio.join(job_dir, jobdir.METRICS_FILE), metrics)
    if metrics["history"]:
        write_loss_plot(metrics["history"], fileio.join(job_dir, jobdir.LOSS_PLOT))


def save_weights(job_dir: str, model, config) -> str:
    """final/: the trained weights and the config that rebuilds them, for export."""
    path = fileio.join(job_dir, jobdir.FINAL, "model.weights.h5")
    fileio.write_through_local(path, model.save_weights)
    fileio.write_text(fileio.join(job_dir, jobdir.FINAL, CONFIG_FILE), config.to_json())
    return path
