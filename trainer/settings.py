"""The training settings, declared once: each field carries its flag's help, choices and
bounds, `add_flags` makes the command line from them and `Settings` checks them however
it was made (flags, a test, a benchmark), so a new setting is one line here.

Flags are the field names with dashes (`batch_size` -> `--batch-size`); a boolean that is
on by default gets `--no-NAME`; `progress` is three-way (`--progress`, `--no-progress`,
neither: a bar when stderr is a terminal).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from model import fused_attention
from model.decoders import NAMES as DECODERS
from trainer import distribute
from trainer import precision as train_precision
from trainer.scst import BASELINES as SCST_BASELINES
from trainer.scst import XENT_WEIGHT as SCST_XENT_WEIGHT

JIT_CHOICES = ("auto", "on", "off")
METRIC_CHOICES = ("loss", "cider")
EXPORT_CHOICES = ("last", "best", "none")


class SettingsError(ValueError):
    """A setting out of its bounds; str() names the flag."""


def _setting(default, help: str, *, low=None, positive=False, below=None, choices=None, flag=None, alias=None,
             off=None, shorthand=None):
    """off: for a setting with choices, the choice a `--no-NAME` flag stands for; shorthand: (flag, choice),
    another flag that stands for one of the choices."""
    return field(default=default, metadata={"help": help, "low": low, "positive": positive, "below": below,
                                            "choices": choices, "flag": flag, "alias": alias, "off": off,
                                            "shorthand": shorthand})


def _buckets(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 12,16,20, got {text!r}") from None


@dataclass(frozen=True)
class Settings:
    data: str = _setting(None, "data directory from pipelines.preprocess (local or gs://)")
    job_dir: str = _setting(None, "where checkpoints, logs, metrics and the export go")
    epochs: int = _setting(10, "epochs of cross-entropy training", low=1)
    scst_epochs: int = _setting(
        0, "epochs of self-critical training (SCST) on the CIDEr-D of sampled captions after the --epochs of "
        "cross-entropy, from their last weights; each step takes --batch-size images (0: none)", low=0)
    scst_samples: int = _setting(5, "captions sampled per image in an SCST step", low=1, flag="K")
    scst_baseline: str = _setting(
        "mean", "the reward a sample is compared with: the mean of the image's other samples, or the reward of "
        "its greedy caption", choices=SCST_BASELINES)
    scst_learning_rate: float = _setting(5e-5, "Adam's learning rate in the SCST stage (its own optimizer)",
                                         positive=True)
    scst_xent_weight: float = _setting(
        SCST_XENT_WEIGHT, "adds W times the per-token cross-entropy of the images' reference captions to each "
        "SCST step's loss: a pull towards all of them against the reward's pull towards a few phrasings (0: off)",
        low=0.0, flag="W")
    batch_size: int = _setting(64, "global batch, over all replicas", low=1)
    learning_rate: float = _setting(1e-3, "Adam's learning rate (the peak, with a schedule)", positive=True)
    lr_schedule: str = _setting("constant", "constant, or cosine decay to 1% over the run",
                                choices=("constant", "cosine"))
    warmup_steps: int = _setting(0, "linear warmup from 0 over this many steps", low=0)
    clip_norm: float = _setting(5.0, "global gradient-norm clip", positive=True)
    decoder: str = _setting("gru", "the decoder: the paper's attention GRU, or a Transformer (the current TF "
                                   "tutorial's) with --layers, --heads, --ff-units", choices=DECODERS)
    embedding_dim: int = _setting(256, "width of the encoded image features (and the GRU's word embedding)", low=1)
    units: int = _setting(512, "the decoder's width: GRU state and attention units, or the Transformer's model "
                               "width", low=1)
    layers: int = _setting(2, "transformer: decoder blocks", low=1)
    heads: int = _setting(2, "transformer: attention heads (--units a multiple of it)", low=1)
    ff_units: int = _setting(0, "transformer: feed-forward width (0: 2 x --units)", low=0)
    dropout: float = _setting(0.1, "dropout on the decoder's inputs and outputs (transformer: on every "
                                   "sub-layer's output)", low=0.0, below=1.0)
    word_dropout: float = _setting(0.0, "a word fed to the decoder in training becomes <unk> with this "
                                        "probability (the next word must come from the picture)",
                                   low=0.0, below=1.0)
    attention_reg: float = _setting(1.0, "lambda of the doubly stochastic attention regulariser (0: off)", low=0.0)
    gate: bool = _setting(False, "the paper's gating scalar beta on the context")
    precision: str = _setting(
        "auto", "the train step's compute dtype: bfloat16 (float32 variables, softmax and loss) or float32; auto "
        "times both where bfloat16 matrix products are fast (CPUs with AMX or AVX512-BF16, recent GPUs) and takes the "
        "faster, keeps "
        "a resumed job's, and is $CAPTIONER_TRAIN_PRECISION where set; metrics.json records the choice",
        choices=train_precision.CHOICES, shorthand=("--mixed-precision", "bfloat16"))
    attention_kernel: str = _setting(
        "auto", "the time loop's attention on CPU: fused kernels built on first use, or TensorFlow ops (auto: the "
        "kernels where they build; GPUs and bfloat16 use the ops)", choices=fused_attention.CHOICES)
    jit_compile: str = _setting(
        "auto", "XLA for the train step (auto: on with one GPU, off on CPUs; lengths are then padded up to "
        "buckets, so it compiles a few times, not once per length)", choices=JIT_CHOICES)
    strategy: str = _setting("auto", "tf.distribute strategy (auto: from TF_CONFIG and the GPUs)",
                             choices=distribute.CHOICES)
    seed: int = _setting(0, "seeds the weights, dropout and every epoch's data order")
    shuffle_buffer: int = _setting(1024, "captions in the shuffle buffer", low=1)
    bucket_boundaries: tuple = _setting((), "caption-length buckets, e.g. 12,16,20")
    checkpoint_every: int = _setting(500, "steps between checkpoints, besides every epoch end (0: epoch ends only)",
                                     low=0)
    keep_checkpoints: int = _setting(3, "newest checkpoints kept (the best one is kept apart)", low=1)
    early_stopping: int = _setting(0, "stop after this many epochs without a better --early-stopping-metric "
                                      "(0: off); it ends the cross-entropy stage, and --scst-epochs then run",
                                   low=0, flag="PATIENCE")
    early_stopping_metric: str = _setting(
        "loss", "what early stopping and checkpoints/best follow: the val loss (the default; lower is better) or the "
        "val CIDEr of the --eval-images captions (higher is better)", choices=METRIC_CHOICES)
    max_steps: int = _setting(0, "stop after this many steps in all (0: no limit)", low=0)
    validate: bool = _setting(True, "the val split's loss, and the caption metrics, after every epoch")
    eval_images: int = _setting(
        200, "val images greedy-captioned after every epoch by the model in training, scored like the evaluation "
        "(BLEU, METEOR, ROUGE-L, CIDEr; attention correctness where there are boxes) into TensorBoard and "
        "history.json (0: off)", low=0, flag="N")
    samples: int = _setting(3, "of those, the first N drawn every epoch into TensorBoard: the picture with one "
                               "attention panel per word, and the generated beside the reference captions (0: none)",
                            low=0, flag="N")
    export: str = _setting("last", "the SavedModel export at the end: of the newest checkpoint (the default) or of "
                                   "checkpoints/best; none (or --no-export): no export", choices=EXPORT_CHOICES,
                           off="none")
    evaluate: bool = _setting(True, "scoring the export on the val split with the COCO caption metrics (large sets: "
                                    "turn off)", alias="--no-eval")
    progress: bool | None = _setting(None, "the progress bar (default: when stderr is a terminal)")

    def __post_init__(self):
        if isinstance(self.bucket_boundaries, list):
            object.__setattr__(self, "bucket_boundaries", tuple(self.bucket_boundaries))
        for f in dataclasses.fields(self):
            value, m = getattr(self, f.name), f.metadata
            if value is None:
                if f.name in ("data", "job_dir"):
                    raise SettingsError(f"{flag_name(f)} is required")
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{flag_name(f)} must be a finite number, got {value}")
            if m["choices"] and value not in m["choices"]:
                raise SettingsError(f"{flag_name(f)} {value}: choose one of {', '.join(m['choices'])}")
            if m["low"] is not None and value < m["low"]:
                raise SettingsError(f"{flag_name(f)} must be at least {m['low']}, got {value}")
            if m["positive"] and not value > 0:
                raise SettingsError(f"{flag_name(f)} must be positive, got {value}")
            if m["below"] is not None and not value < m["below"]:
                raise SettingsError(f"{flag_name(f)} must be below {m['below']}, got {value}")
        b = self.bucket_boundaries
        if list(b) != sorted(set(b)) or any(x < 2 for x in b):
            raise SettingsError(f"--bucket-boundaries must be increasing lengths >= 2, got {','.join(map(str, b))}")
        self._check_validation_needs()
        self._check_decoder()

    def _check_decoder(self):
        if self.decoder != "transformer":
            return
        if self.units % self.heads:
            raise SettingsError(f"--units {self.units} must be a multiple of --heads {self.heads}: the transformer "
                                "splits its width over the heads")
        if self.gate:
            raise SettingsError("--gate is the GRU's context gate; the transformer decoder has none")

    def _check_validation_needs(self):
        """What needs the per-epoch validation, refused before the job starts rather than found
        missing when it ends (a --export best with no best checkpoint, after hours of training)."""
        if self.early_stopping_metric == "cider" and not (self.validate and self.eval_images):
            raise SettingsError("--early-stopping-metric cider needs the per-epoch caption metrics: "
                                "--eval-images above 0, and validation on")
        if self.export == "best" and not self.validate:
            raise SettingsError("--export best needs validation (--no-validate keeps no best checkpoint)")
        if self.scst_epochs and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise SettingsError(f"--scst-samples {self.scst_samples}: the mean baseline needs at least 2 samples "
                                "an image (or --scst-baseline greedy)")
        if self.eval_images and self.samples > self.eval_images:
            raise SettingsError(f"--samples {self.samples}: at most --eval-images ({self.eval_images}), "
                                "the samples are the first of those images")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its default, help and choices taken from the declaration."""
    for f in dataclasses.fields(Settings):
        name, m, default = flag_name(f), dict(f.metadata), f.default
        m["help"] = m["help"].replace("%", "%%")  # argparse formats help with %
        if f.name == "progress":
            parser.add_argument(name, dest=f.name, action="store_true", default=None, help="always show the bar")
            parser.add_argument("--no-progress", dest=f.name, action="store_false", help="never show it")
        elif isinstance(default, bool) and default:
            names = ["--no-" + name[2:]] + ([m["alias"]] if m["alias"] else [])
            parser.add_argument(*names, dest=f.name, action="store_false", help=f"skip {m['help']}")
        elif isinstance(default, bool):
            parser.add_argument(name, action="store_true", help=m["help"])
        elif f.name in ("data", "job_dir"):
            parser.add_argument(name, required=True, help=m["help"])
        else:
            kind = _buckets if f.name == "bucket_boundaries" else type(default)
            parser.add_argument(name, type=kind, default=default, choices=m["choices"], metavar=m["flag"],
                                help=f"{m['help']} (default: {_shown(default)})" if not m["choices"] else m["help"])
            if m["off"] is not None:
                parser.add_argument("--no-" + name[2:], dest=f.name, action="store_const", const=m["off"],
                                    help=f"the same as {name} {m['off']}")
            if m["shorthand"] is not None:
                other, choice = m["shorthand"]
                parser.add_argument(other, dest=f.name, action="store_const", const=choice,
                                    help=f"the same as {name} {choice}")


def _shown(default) -> str:
    return ",".join(map(str, default)) or "none" if isinstance(default, tuple) else str(default)


def from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
