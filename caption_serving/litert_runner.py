"""Captioning with a LiteRT model (caption_serving/litert.py makes it) on the `ai-edge-litert`
interpreter: what `caption photo.jpg --model captioner.tflite` runs.

    runner, info = load("captioner.tflite")       # and captioner.json beside it
    rows = runner.caption_batch([pixels], beam_size=None, max_length=info["default_max_length"])

Rows are shaped as client.rows gives them for a SavedModel ({"caption", "score", "words",
"attention", "nbest"}), so the `caption` command prints, plots and writes JSON the same way for
both. Words are written back from token ids here, in Python (caption_io.tokenizer's rule, the one
the SavedModel spells with in the graph): the model itself holds no strings.

TensorFlow is not needed: the interpreter, numpy and the sidecar are all this reads.
"""
from __future__ import annotations

import importlib
import json
import os

import numpy as np

from caption_io import cli, savedmodel, tokenizer, vocab
from caption_serving.client import CONTROL_DEFAULTS, ModelError

SUFFIX = ".tflite"
SIGNATURE = "serving_default"  # the converter's name for a file's one signature
INPUTS = ("pixels",)
OUTPUTS = ("tokens", "lengths", "scores", "attention")
FORMAT = "caption_serving.litert"  # the sidecar's "format": what made it
FORMAT_VERSION = 1


class LiteRTError(ModelError):
    """A LiteRT captioner that cannot be made or used (one readable line; exit 2)."""


def is_litert(path: str) -> bool:
    """Whether --model names a LiteRT file rather than an export directory."""
    return path.endswith(SUFFIX)


def sidecar_path(model_path: str) -> str:
    """The JSON beside a model file: its vocabulary and how it was made (captioner.json)."""
    stem = model_path[:-len(SUFFIX)] if model_path.endswith(SUFFIX) else model_path
    return stem + ".json"


def litert_module(module: str):
    """A module of ai-edge-litert, which the project installs as an extra (it is not needed to
    train or to serve the SavedModel)."""
    try:
        return importlib.import_module(f"ai_edge_litert.{module}")
    except ImportError:
        raise LiteRTError("LiteRT models need the ai-edge-litert package: "
                          "pip install 'show-attend-tell[litert]'") from None


def operator_names(data: bytes) -> list[str]:
    """The name of every operator code a LiteRT flatbuffer uses, in every subgraph: a builtin
    op's name (CONV_2D, WHILE, ...), or "CUSTOM:<its code>" (a Flex op is CUSTOM:FlexXxx)."""
    schema = litert_module("schema_py_generated")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(data, 0)
    found = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            found.append(f"CUSTOM:{(code.CustomCode() or b'').decode()}")
        else:
            found.append(names.get(builtin, f"BUILTIN_{builtin}"))
    return found


def non_builtin_ops(data: bytes) -> list[str]:
    """The operators of a flatbuffer that are not LiteRT builtins (none for a captioner)."""
    return [name for name in operator_names(data) if name.startswith("CUSTOM:")]


class Runner:
    """One LiteRT captioner: its interpreter, vocabulary and the sidecar's record."""

    def __init__(self, path: str, record: dict, num_threads: int | None = None):
        interpreter_module = litert_module("interpreter")
        try:
            interpreter = interpreter_module.Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
        except (ValueError, RuntimeError) as e:
            raise LiteRTError(f"not a LiteRT model ({cli.one_line(e)[:160]})") from None
        signatures = interpreter.get_signature_list()
        found = signatures.get(SIGNATURE, {})
        if set(found.get("inputs", ())) != set(INPUTS) or set(found.get("outputs", ())) != set(OUTPUTS):
            raise LiteRTError(f"not a captioner made by python -m caption_serving.litert (its signatures: "
                              f"{json.dumps(signatures)[:160]})")
        self.record = record
        self.tokens = record["tokens"]
        self.beam_size = int(record["beam_size"])
        self.max_length = int(record["max_length"])
        self.length_alpha = float(record["length_alpha"])
        self._run = interpreter.get_signature_runner(SIGNATURE)

    @property
    def info(self) -> dict:
        """What the `caption` command reads from an export's export.json, from the sidecar."""
        return {"encoder": self.record.get("encoder"), "default_max_length": self.max_length,
                savedmodel.INFO_BEAM_SIZE: self.beam_size}

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """One image's uint8 [H, W, 3] pixels -> the model's outputs (the beam's hypotheses,
        best first: tokens [K, L], lengths [K], scores [K], attention [K, L, P])."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
            raise ValueError(f"pixels must be uint8 [H, W, 3], got shape {pixels.shape}")
        return self._run(pixels=pixels)

    def caption_batch(self, images: list[np.ndarray], beam_size: int | None, max_length: int,
                      **controls) -> list[dict]:
        """Each image's caption rows, as client.rows gives them for a SavedModel. The file's beam
        size (None: take it), longest caption and length normalisation were fixed when it was
        made; asking for others is a LiteRTError saying so."""
        num_captions = self._check(beam_size, max_length, controls)
        found = []
        for pixels in images:
            out = self.run(pixels)
            places = [self._row(out, k) for k in range(num_captions) if out["lengths"][k] > 0]
            found.append(dict(places[0], nbest=places))
        return found

    def _check(self, beam_size: int | None, max_length: int, controls: dict) -> int:
        """The decoding options this file can honour -> num_captions; others are refused."""
        if beam_size not in (None, self.beam_size):
            raise LiteRTError(f"this file searches with {self.beam_size} beam(s) (fixed when it was converted); "
                              f"convert again with --beam-size {beam_size} for others")
        if max_length != self.max_length:
            raise LiteRTError(f"this file makes captions of up to {self.max_length} tokens (fixed when it was "
                              f"converted); convert again with --max-length {max_length} for others")
        asked = dict(CONTROL_DEFAULTS, **{k: v for k, v in controls.items() if v is not None})
        fixed = {"no_repeat_ngram": 0, "min_length": 0, "length_alpha": self.length_alpha}
        refused = [k for k, v in fixed.items() if asked[k] != v]
        if refused:
            raise LiteRTError(f"this file cannot apply {', '.join(refused)} (it decodes with no repetition or "
                              f"length bans and length_alpha {self.length_alpha:g}); use the SavedModel for these")
        if not 1 <= asked["num_captions"] <= self.beam_size:
            raise LiteRTError(f"--num-captions must be between 1 and this file's beam size ({self.beam_size})")
        return int(asked["num_captions"])

    def _row(self, out: dict, k: int) -> dict:
        """Hypothesis k of the beam as a caption row: its words (vocab.is_word) with their
        attention rows, written as the SavedModel writes them."""
        length = int(out["lengths"][k])
        ids = out["tokens"][k][:length]
        if ids.size and ids.max() >= len(self.tokens):
            raise LiteRTError(f"token id {ids.max()} is past the {len(self.tokens)} tokens of the vocabulary beside "
                              "the model: the two were not made together")
        is_word = vocab.is_word(ids)
        words = [self.tokens[i] for i in ids[is_word]]
        return {"caption": tokenizer.join(words), "score": float(out["scores"][k]),
                "words": [tokenizer.label(w) for w in words], "attention": out["attention"][k][:length][is_word]}


def read_sidecar(model_path: str) -> dict:
    """The JSON beside a model file, checked: it must be a captioner's, with its vocabulary."""
    path = sidecar_path(model_path)
    if not os.path.exists(path):
        raise LiteRTError(f"no vocabulary beside it: {path} is missing (python -m caption_serving.litert writes "
                          "it with the model; copy the two together)")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise LiteRTError(f"{path}: not readable JSON ({cli.one_line(e)[:120]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LiteRTError(f"{path}: not a captioner's vocabulary file (no \"format\": \"{FORMAT}\")")
    tokens = record.get("tokens")
    if not isinstance(tokens, list) or tuple(tokens[:len(vocab.SPECIALS)]) != vocab.SPECIALS:
        raise LiteRTError(f"{path}: its \"tokens\" are not a vocabulary (the first four must be "
                          f"{', '.join(vocab.SPECIALS)})")
    missing = [k for k in ("beam_size", "max_length", "length_alpha") if not isinstance(record.get(k), (int, float))]
    if missing:
        raise LiteRTError(f"{path}: no {', '.join(missing)} (write it again with python -m caption_serving.litert)")
    return record


def load(path: str, num_threads: int | None = None) -> tuple[Runner, dict]:
    """-> (the runner, an export.json-like record for the `caption` command)."""
    if not os.path.isfile(path):
        raise LiteRTError("no such file")
    runner = Runner(path, read_sidecar(path), num_threads)
    return runner, runner.info
