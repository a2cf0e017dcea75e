"""Caption metrics while training: after every epoch, the model in training captions a fixed
subset of the val split (its first --eval-images images, greedy) and the captions are scored
by the evaluation's own evaluators (caption_eval), so a user sees whether captions improve,
not only the loss, and early stopping and checkpoints/best can follow CIDEr.

The captions come from the export's caption_features function wrapped around the model in
training (caption_serving.export.CaptionModule), called with beam size 1: the same decoding,
the same words and the same attention rows as the SavedModel the job exports, so the figures
here are the ones `caption_eval.evaluate --beam-size 1` gives for the same checkpoint on the
same images (a test checks it). The captions are cut at the export's default length.

Cost (figures in docs/ARCHITECTURE.md): the one METEOR Java process is started with the
trainer and kept for the run (its start is seconds, a scoring a fraction of one); the samples
are drawn while METEOR scores; their pictures are read once.
"""
from __future__ import annotations

import concurrent.futures

import numpy as np

from caption_eval import evaluate, gallery
from caption_eval.evaluators import coco_metrics, novel_pairs
from caption_io import savedmodel

# Figures of an epoch's record (history.json) as "val_" + name, in TensorBoard as "captions/" + name.
CAPTION_FIGURES = coco_metrics.METRIC_KEYS + (
    "attention_share", "attention_chance", "exact_objects", "exact_objects_novel", "exact_objects_seen",
    "distinct_captions", "openings", "vocabulary", "mean_length", "says_where")
SPLIT = "val"
BATCH = 64  # images a decoding call


def figures(metrics: dict) -> dict:
    """The evaluation's metrics (as metrics.json nests them) -> an epoch record's flat figures."""
    out = {f"val_{k}": metrics[k] for k in coco_metrics.METRIC_KEYS}
    attention = metrics.get("attention_correctness")
    if attention and attention["words"]:
        out.update(val_attention_share=attention["share"], val_attention_chance=attention["chance"])
    objects = metrics.get("exact_objects")
    if objects and objects["all"]["images"]:
        out["val_exact_objects"] = objects["all"]["share"]
    novel = metrics.get("novel_pairs")
    for group in novel_pairs.GROUPS if novel else ():
        if novel[group]["images"]:
            out[f"val_exact_objects_{group}"] = novel[group]["exact_objects"]
    variety = metrics.get("variety")
    if variety and variety["captions"]:
        out.update({f"val_{k}": variety[k] for k in ("distinct_captions", "openings", "vocabulary", "mean_length",
                                                     "says_where") if variety.get(k) is not None})
    out["eval_images"] = metrics["n_images"]
    return out


class EpochEvaluation:
    """Captions and scores the subset with the model in training; one per training run.

    model: the trainer's Captioner (read at each run(), so it scores the current weights);
    meta: the data directory's metadata (its source's boxes and images, its encoder's grid);
    tokens: the vocabulary; files: the val shards; images: the subset's size; samples: how
    many of its first images run() returns drawn, for TensorBoard (0 on workers that write none).
    """

    def __init__(self, model, meta, tokens: list[str], files: list[str], images: int, samples: int):
        from caption_serving import client, export

        self.files, self.images, self.samples = files, images, samples
        self.max_length = savedmodel.default_max_length(meta.max_tokens)
        # The export's module around the model in training (no encoder: features are stored), and
        # what caption_split calls, a Captioner made of its caption_features.
        self._module = export.CaptionModule(model, None, None, tokens, beam_size=1, max_length=self.max_length)
        self._captioner = client.CaptionFunctions({savedmodel.CAPTION_FEATURES: self._module.caption_features})
        _, self.boxes = evaluate.split_boxes(meta, SPLIT)
        self.grid, self.feature_shape = meta.geometry.grid, meta.features.shape
        self.image_dirs = evaluate.default_image_dirs(meta, SPLIT)
        self._pictures: dict[int, np.ndarray] = {}
        try:
            self.meteor = coco_metrics.Meteor().start()  # it loads while the first epoch trains
        except coco_metrics.ScoringError as e:
            raise coco_metrics.ScoringError(f"{e}; or train without the per-epoch caption metrics: "
                                            "--eval-images 0") from None

    def run(self) -> tuple[dict, list[dict]]:
        """-> (the epoch's figures, as `figures` flattens them; the samples: their items, as
        caption_split gives them, each with "png", the attention plot, or None for an empty caption)."""
        coco = coco_metrics.CocoMetrics(meteor=self.meteor)
        nested = evaluate.split_evaluators(self.boxes, coco, self.grid)
        evaluators = [coco] + [e for e in nested.values() if e]
        shown = []
        items = evaluate.caption_split(self._captioner, self.files, self.feature_shape, 1, self.max_length, BATCH,
                                       self.images)
        for item in items:
            for evaluator in evaluators:
                evaluator.add(item)
            if len(shown) < self.samples:
                shown.append(item)

        def summaries() -> dict:
            metrics = coco.summary()
            metrics.update({key: e.summary() if e else None for key, e in nested.items()})
            return metrics

        # METEOR computes in its Java process while this thread draws the samples.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            scored = pool.submit(summaries)
            samples = [dict(item, png=self._plot(item)) for item in shown]
            return figures(scored.result()), samples

    def _plot(self, item: dict) -> bytes | None:
        """The `caption --plot` picture of a sample: its image, one attention panel per word."""
        from caption_serving import plot

        if not item["words"]:
            return None
        if item["image_id"] not in self._pictures:
            self._pictures[item["image_id"]] = gallery.picture(item, self.image_dirs,
                                                               gallery.canvas_sizes(self.boxes))[0]
        return plot.attention_png(self._pictures[item["image_id"]], item["words"], item["attention"], self.grid)

    def close(self) -> None:
        self.meteor.close()


def samples_markdown(samples: list[dict], epoch: int) -> str:
    """The samples' generated and reference captions as a Markdown table (TensorBoard's text tab)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|") or "*(empty)*"

    rows = [f"| {cell(s['file_name'])} | **{cell(s['caption'])}** | {'<br>'.join(map(cell, s['references']))} |"
            for s in samples]
    return "\n".join([f"epoch {epoch}, greedy captions", "", "| image | generated | references |",
                      "| --- | --- | --- |", *rows])
