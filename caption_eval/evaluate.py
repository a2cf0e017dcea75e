"""Score an exported captioner on a split of its data directory.

    python -m caption_eval.evaluate --model EXPORT_DIR [--data DATA_DIR] [--split val|test]
        [--beam-size 3] [--max-length N] [--output DIR] [--images-dir DIR]
        [--instances FILE] [--gallery N] [--spice]

Captions every image of the split from its stored features (the export's
caption_features signature, in batches), scores the captions against all of each
image's reference captions with the COCO caption toolkit's scorers (pycocoevalcap:
BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE only with --spice, it needs a download),
and where the data set has object boxes, measures attention correctness. Writes to
--output (default: EXPORT_DIR/../eval-SPLIT, i.e. JOB_DIR/eval-val):
  results.json    COCO results format, [{"image_id": ..., "caption": ...}]
  metrics.json    the metrics, n_images, beam_size, attention and object figures
  gallery/        index.html with --gallery images (default 12): the worst half by their own
                  CIDEr, and the first others in split order

Each figure comes from an evaluator (caption_eval.evaluators), fed every image in
the one pass over the split, so a new figure costs no second run of the model.
Text is normalised with caption_io.text.normalize, not pycocoevalcap's
PTBTokenizer (the reason is in caption_eval.evaluators.coco_metrics).
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before anything imports TensorFlow
    from caption_io import quiet

    quiet.install()

import sys
import time
import typing

from caption_eval.evaluators.coco_metrics import METRIC_KEYS
from caption_io import cli, decoding_defaults, fileio

if typing.TYPE_CHECKING:  # (imported where used: it brings TensorFlow)
    from caption_io import metadata


# ------------------------------------------------------------------- where the source lives
def default_image_dirs(meta: metadata.Metadata, split: str) -> list[str]:
    """Folders that may hold the split's images, from metadata.json's "source"."""
    source = meta.source
    kind, path = source.kind, source.path
    if kind == "coco" and path:
        return [fileio.join(path, f"{split}{source.year or '2014'}")]
    if kind == "karpathy" and source.images_dir:
        # Karpathy's val and test images come from COCO's val2014 (restval from it too).
        base = source.images_dir
        return [fileio.join(base, "val2014"), fileio.join(base, "train2014"), base]
    if kind == "jsonl" and path:
        return [path.rsplit("/", 1)[0] if "/" in path else "."]  # file names are relative to it
    return []


def default_instances(meta: metadata.Metadata, split: str) -> list[str]:
    source = meta.source
    if source.kind == "coco" and source.path:
        return [fileio.join(source.path, "annotations", f"instances_{split}{source.year or '2014'}.json")]
    if source.kind == "karpathy" and source.images_dir:
        return [fileio.join(source.images_dir, "annotations", "instances_val2014.json")]
    return []


def split_boxes(meta: metadata.Metadata, split: str, instances: str | None = None) -> tuple[str | None, dict | None]:
    """(where the split's object boxes were read, the boxes as attention.load_instances gives
    them): from `instances` (--instances, which must exist), else from the source's COCO
    layout; (None, None) where there are none."""
    from caption_eval.evaluators import attention

    if instances:
        if not fileio.exists(instances):
            raise UsageError(f"--instances {instances}: no such file")
        path = instances
    else:
        path = next((p for p in default_instances(meta, split) if fileio.exists(p)), None)
    return path, attention.load_instances(path) if path else None


def split_evaluators(boxes: dict | None, coco, grid: tuple[int, int]) -> dict:
    """The evaluators beside the COCO metrics (`coco`, a CocoMetrics), under their metrics.json
    keys; None where the data cannot support one: attention needs object boxes, exact objects
    and where a caption places them the scene set's colours, the novel-pair figures a scene set
    with held-out pairs. Summarise `coco` first: the novel-pair figures read its per-image CIDEr.
    grid: the encoder's (rows, columns), the data directory's `meta.geometry.grid`: where the
    attention figures place each weight."""
    from caption_eval.evaluators import attention, exact_objects, novel_pairs, variety
    from caption_io import scenes

    scene_set = exact_objects.has_colours(boxes)
    return {"attention_correctness": attention.AttentionCorrectness(boxes, grid) if boxes else None,
            "exact_objects": exact_objects.ExactObjects(boxes) if scene_set else None,
            "novel_pairs": novel_pairs.NovelPairs(boxes, coco, grid)
            if scene_set and novel_pairs.has_novel_pairs(boxes) else None,
            "variety": variety.Variety(scenes.POSITION_WORDS if scene_set else None)}


def annotate(items: list[dict], coco, boxes: dict | None) -> list[dict]:
    """The gallery's items with what the evaluation learnt of each: "cider" (its own CIDEr),
    "novel_pair" and "objects_right" (scene set: a held-out pair in it; its objects named
    exactly), None where unknown. `coco` must have been summarised."""
    from caption_eval.evaluators import exact_objects, novel_pairs

    scene_set, held_out = exact_objects.has_colours(boxes), novel_pairs.has_novel_pairs(boxes)
    out = []
    for item in items:
        image = boxes["images"].get(int(item["image_id"])) if scene_set else None
        right = exact_objects.names_exactly(item["caption"], image["objects"]) if image else None
        group = novel_pairs.group(boxes, item["image_id"]) if held_out else None
        out.append(dict(item, cider=coco.image_cider.get(item["image_id"]), objects_right=right,
                        novel_pair=None if group is None else group == novel_pairs.GROUPS[0]))
    return out


# ------------------------------------------------------------------------- the evaluation run
def caption_split(model, files: list[str], feature_shape: tuple[int, int], beam_size: int, max_length: int,
                  batch_size: int = 32, limit: int | None = None, controls: dict | None = None):
    """Per image of the shards, in order (the first `limit` alone, when given): {"image_id",
    "file_name", "references", "caption", "words", "attention" [len(words), positions]}. Streams: a
    COCO-sized split never holds more than one batch of feature maps. `model` is a
    client.Captioner with the caption_features signature: a loaded export, or the trainer's
    client.CaptionFunctions around the model in training;
    feature_shape: the stored features' [positions, channels] (metadata.json's features.shape);
    controls: decoding controls beside the beam (client.CONTROL_DEFAULTS' names)."""
    import tensorflow as tf

    from caption_io import records
    from caption_serving import client

    ds = tf.data.TFRecordDataset(files)
    if limit is not None:
        ds = ds.take(limit)
    ds = ds.batch(batch_size).map(lambda serialized: records.parse_examples(serialized, feature_shape))
    for batch in ds:
        texts = batch["caption_text"].to_list()
        rows = client.caption_features(model, batch["features"], beam_size, max_length, **(controls or {}))
        for i, (image_id, row) in enumerate(zip(batch["image_id"].numpy(), rows)):
            yield {"image_id": int(image_id), "file_name": batch["file_name"][i].numpy().decode("utf-8"),
                   "references": [t.decode("utf-8") for t in texts[i]], "caption": row["caption"],
                   "words": row["words"], "attention": row["attention"]}


def _open_export(model_dir: str, data_dir: str | None) -> tuple:
    """-> (the loaded export, its export.json, the data directory: `data_dir`, else the one the
    export records). An export without caption_features, or a recorded path that is gone, is a
    UsageError; one that cannot be loaded, a ModelError."""
    from caption_io import jobdir
    from caption_io.savedmodel import CAPTION_FEATURES, EXPORT_INFO
    from caption_serving.client import load_model

    model, info = load_model(model_dir)
    if CAPTION_FEATURES not in model.signatures:
        raise UsageError(f"--model {model_dir}: no caption_features signature (re-export with caption_serving.export)")
    if not data_dir:
        try:
            data_dir = jobdir.recorded_data(info, fileio.join(model_dir, EXPORT_INFO), model_dir)
        except jobdir.RecordedPathError as e:
            raise UsageError(str(e)) from None
    return model, info, data_dir


def _default_output(model_dir: str, split: str) -> str:
    """Beside the export: JOB_DIR/export -> JOB_DIR/eval-val."""
    from caption_io import jobdir

    parent = model_dir.rstrip("/").rsplit("/", 1)[0] if "/" in model_dir.rstrip("/") else "."
    return fileio.join(parent, jobdir.eval_dir(split))


def _feed(items, evaluators: list, gallery_size: int, batch_size: int, total: int | None, start: float) -> list:
    """Every captioned item to every evaluator, with a progress line on stderr every 20 batches.
    -> every item (attention in float16) when there is a gallery to choose from, else none."""
    import numpy as np

    kept = []
    for n, item in enumerate(items, 1):
        for evaluator in evaluators:
            evaluator.add(item)
        if gallery_size > 0:
            kept.append(dict(item, attention=np.asarray(item["attention"], np.float16)))
        if n % (batch_size * 20) == 0:
            print(f"captioned {n}{f'/{total}' if total else ''} images ({time.time() - start:.0f}s)", file=sys.stderr)
    return kept


def _write_outputs(output: str, metrics: dict, results: list, shown: list, gallery_size: int,
                   images_dir: str | None, meta: metadata.Metadata, split: str, boxes: dict | None) -> None:
    """results.json, the gallery (its path goes into `metrics`), then metrics.json, last."""
    from caption_eval import gallery

    metrics["output"] = output
    fileio.write_json(fileio.join(output, "results.json"), results)
    if gallery_size > 0:
        dirs = [images_dir] if images_dir else default_image_dirs(meta, split)
        metrics["gallery"] = gallery.write(fileio.join(output, "gallery"), shown, dirs, meta.geometry.grid,
                                           gallery.canvas_sizes(boxes), table(metrics))
    fileio.write_json(fileio.join(output, "metrics.json"), metrics)


def evaluate(model_dir: str, data_dir: str | None = None, split: str = "val",
             beam_size: int = decoding_defaults.BEAM_SIZE,
             max_length: int | None = None, output: str | None = None, images_dir: str | None = None,
             instances: str | None = None, gallery_size: int = 12, spice: bool = False,
             batch_size: int = 32, controls: dict | None = None) -> dict:
    """Run the whole evaluation, write its files, return metrics.json's content. METEOR's Java
    process is started first: it loads (seconds) while the export loads and captions the split."""
    from caption_eval import gallery
    from caption_eval.evaluators import coco_metrics
    from caption_io import metadata, savedmodel

    with coco_metrics.Meteor() as meteor:
        model, info, data_dir = _open_export(model_dir, data_dir)
        meta = metadata.read(data_dir)
        files = metadata.shard_files(data_dir, split, meta)
        max_length = max_length or savedmodel.export_max_length(info)
        output = output or _default_output(model_dir, split)

        boxes_from, boxes = split_boxes(meta, split, instances)
        coco = coco_metrics.CocoMetrics(spice=spice, meteor=meteor)
        nested = split_evaluators(boxes, coco, meta.geometry.grid)
        evaluators = [coco] + [e for e in nested.values() if e]

        start = time.time()
        items = caption_split(model, files, meta.features.shape, beam_size, max_length, batch_size, controls=controls)
        shown = _feed(items, evaluators, gallery_size, batch_size, meta.splits[split].images.written or None, start)
        caption_seconds = time.time() - start
        try:
            metrics = coco.summary()
        except ValueError as e:  # the shards hold an image twice, or one without captions
            raise UsageError(f"--data {data_dir}, {split} split: {e}") from None
        metrics.update({"split": split, "beam_size": beam_size, "max_length": max_length, "decoding": controls or {},
                        "model": model_dir,
                        "data": data_dir, "text_normalisation": "caption_io.text.normalize (tensorflow-text)",
                        "caption_seconds": round(caption_seconds, 1),
                        "score_seconds": round(time.time() - start - caption_seconds, 1)})
        metrics["instances"] = boxes_from
        if not boxes:
            looked = ", ".join(default_instances(meta, split)) or "nowhere: the data's source has no COCO layout"
            metrics["instances_note"] = f"no object boxes, so no attention figures (looked {looked}; pass --instances)"
        metrics.update({key: e.summary() if e else None for key, e in nested.items()})
        shown = annotate(gallery.choose(shown, coco.image_cider, gallery_size), coco, boxes)
        _write_outputs(output, metrics, coco.results, shown, gallery_size, images_dir, meta, split, boxes)
        return metrics


def table(metrics: dict) -> str:
    """The metrics as a small text table."""
    rows = [(k, f"{metrics[k]:.3f}") for k in METRIC_KEYS + ("SPICE",) if metrics.get(k) is not None]
    a = metrics.get("attention_correctness")
    if a and a["words"]:
        rows.append(("attention on object", f"{a['share']:.3f}  (chance {a['chance']:.3f}, "
                                            f"{a['ratio']:.1f}x; {a['words']} words)"))
    for n, e in (metrics.get("exact_objects") or {}).items():
        if e["images"]:
            label = "exact objects, all" if n == "all" else f"exact objects, {n}-object"
            rows.append((label, f"{e['share']:.3f}  ({e['exact']}/{e['images']} images)"))
    from caption_eval.evaluators.novel_pairs import GROUPS

    novel = metrics.get("novel_pairs")
    for g in GROUPS if novel else ():
        part = novel[g]
        if part["images"]:
            figures = [f"exact objects {part['exact_objects']:.3f}", f"CIDEr {part['CIDEr']:.3f}"]
            if part["attention_ratio"] is not None:
                figures.append(f"attention {part['attention_ratio']:.1f}x chance")
            rows.append((f"{g}-pair scenes", f"{', '.join(figures)}  ({part['images']} images)"))
    v = metrics.get("variety")
    if v and v["captions"]:
        rows.append(("distinct captions", f"{v['distinct_captions']:.3f}  ({v['openings']} openings, "
                                          f"{v['vocabulary']} words used, {v['mean_length']:.1f} a caption)"))
        if v.get("says_where") is not None:
            rows.append(("says where", f"{v['says_where']:.3f}"))
    if metrics.get("instances_note"):
        rows.append(("attention on object", metrics["instances_note"]))
    width = max(len(k) for k, _ in rows)
    head = (f"{metrics['split']}: {metrics['n_images']} images, beam {metrics['beam_size']}"
            f"{', ' + str(metrics['n_empty_captions']) + ' empty captions' if metrics['n_empty_captions'] else ''}")
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


class UsageError(ValueError, cli.UserError):
    """A flag that points at something unusable (one readable line)."""


@cli.command
def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m caption_eval.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SavedModel directory (JOB_DIR/export)")
    ap.add_argument("--data", help="the data directory (default: the one named in the export)")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--beam-size", type=int, default=decoding_defaults.BEAM_SIZE,
                    help=f"1 is greedy decoding (default {decoding_defaults.BEAM_SIZE})")
    ap.add_argument("--max-length", type=int, default=0, help="most tokens a caption (default: the export's)")
    ap.add_argument("--output", help="default: EXPORT_DIR/../eval-SPLIT")
    ap.add_argument("--images-dir", help="where the split's images are (default: from the data's metadata.json)")
    ap.add_argument("--instances", help="a COCO instances JSON with object boxes "
                                        "(default: <coco>/annotations/instances_SPLIT2014.json)")
    ap.add_argument("--gallery", type=int, default=12, metavar="N", help="images in the gallery (default 12, 0: none)")
    ap.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP on first use)")
    ap.add_argument("--batch-size", type=int, default=32, help="images a model call (default 32)")
    from caption_serving import client

    client.add_decoding_flags(ap)  # the best caption is the one scored; --num-captions changes nothing here
    a = ap.parse_args(argv)
    if a.beam_size < 1 or a.max_length < 0 or a.gallery < 0 or a.batch_size < 1:
        ap.error("--beam-size and --batch-size must be >= 1, --max-length and --gallery >= 0")
    try:
        controls = client.decoding_controls(a, a.beam_size)
    except ValueError as e:
        ap.error(str(e))
    # Only the controls asked for: metrics.json's "decoding" then says how this run differs from the defaults.
    controls = {k: v for k, v in controls.items() if v != client.CONTROL_DEFAULTS[k]}

    from caption_serving.client import ModelError

    try:
        metrics = evaluate(a.model, a.data, a.split, a.beam_size, a.max_length or None, a.output, a.images_dir,
                           a.instances, a.gallery, a.spice, a.batch_size, controls)
    except ModelError as e:  # the line names the flag; exit 2 (ModelError's)
        raise ModelError(f"--model {a.model}: {e}") from None
    print(table(metrics))
    print(f"results, metrics{' and gallery' if metrics.get('gallery') else ''} in {metrics['output']}")
    if metrics.get("spice_error"):
        print(f"error: {metrics['spice_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
