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
  gallery/        index.html with the first --gallery images (default 12)

Text: references and candidates are normalised with the project's own
caption_io.text.normalize (the function that made the vocabulary), not with
pycocoevalcap's PTBTokenizer: the model's words were cut by that function, so
scoring with another tokenizer would count tokenizer disagreements as caption
errors, and it saves the PTBTokenizer's separate Java run.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from caption_io import cli, fileio
from pipelines import synthetic
from caption_io import text as text_lib

GRID = 8  # the encoder's feature map is 8x8 (64 attention weights a word)
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class ScoringError(RuntimeError):
    """A scorer that could not run (Java missing, SPICE's download unreachable)."""


# ----------------------------------------------------------------------------------- scoring
def _some(ids, n: int = 5) -> str:
    try:
        ids = sorted(ids)
    except TypeError:  # ids of mixed types (a results file with "12" beside 12)
        ids = sorted(ids, key=repr)
    return ", ".join(str(i) for i in ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def check_results(results, references: dict) -> dict:
    """{image_id: caption} from a COCO results list, or a ValueError that names the
    image ids that are missing, extra or duplicated relative to the references."""
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of {{'image_id', 'caption'}} objects, got {type(results).__name__}")
    captions, dup = {}, []
    for k, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ValueError(f"results[{k}] is not an {{'image_id', 'caption': str}} object: {str(r)[:80]}")
        if r["image_id"] in captions:
            dup.append(r["image_id"])
        captions[r["image_id"]] = r["caption"]
    missing = set(references) - set(captions)
    extra = set(captions) - set(references)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} image id(s) (references but no caption): {_some(missing)}")
    if extra:
        problems.append(f"extra {len(extra)} image id(s) (a caption but no references): {_some(extra)}")
    if dup:
        problems.append(f"duplicate {len(set(dup))} image id(s) (captioned more than once): {_some(set(dup))}")
    if problems:
        raise ValueError("results do not match the references: " + "; ".join(problems))
    return captions


def _normalise(texts: list[str]) -> list[str]:
    if not texts:
        return []
    return [t.decode("utf-8") for t in text_lib.normalize(texts).numpy()]


def _prepare(results, references: dict) -> tuple[dict, dict]:
    """Checked and normalised (gts, res) in the scorers' format: {id: [captions]}, {id: [caption]}."""
    captions = check_results(results, references)
    ids = list(references)
    if not ids:
        raise ValueError("nothing to score: no references")
    bad = [i for i in ids if isinstance(references[i], str) or not isinstance(references[i], (list, tuple))]
    if bad:
        raise ValueError(f"references must map each image id to a list of captions; not for {_some(bad)}")
    flat = [r for i in ids for r in references[i]]
    norm = iter(_normalise(flat + [captions[i] for i in ids]))
    gts = {i: [next(norm) for _ in references[i]] for i in ids}
    res = {i: [next(norm)] for i in ids}
    no_refs = [i for i in ids if not any(gts[i])]
    if no_refs:
        raise ValueError(f"{len(no_refs)} image id(s) have no non-empty reference caption: {_some(no_refs)}")
    # Blank references would divide by zero in ROUGE-L; they carry nothing to match.
    return {i: [r for r in refs if r] for i, refs in gts.items()}, res


def score(results, references: dict, spice: bool = False) -> dict:
    """COCO caption metrics of `results` ([{"image_id", "caption"}], one per image)
    against `references` ({image_id: [captions]}), both normalised first.

    Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"], "n_images",
    "n_empty_captions"}. Raises ValueError for results that do not match the
    references, ScoringError when a Java scorer cannot run. CIDEr's document
    frequencies come from these references, so it needs more than one image to be
    non-zero (as in the COCO toolkit).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _prepare(results, references)
    ids = list(gts)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["METEOR"] = _meteor(gts, res)
    # ROUGE-L divides by the candidate's length: an empty caption (the model said
    # <end> first) scores 0, so it is left out of the call and counted as 0.
    spoken = [i for i in ids if res[i][0]]
    rouge = Rouge().compute_score({i: gts[i] for i in spoken}, {i: res[i] for i in spoken})[1] if spoken else []
    out["ROUGE-L"] = float(np.sum(rouge) / len(ids))
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        out["SPICE"] = _spice(gts, res)
    out["n_images"] = len(ids)
    out["n_empty_captions"] = sum(1 for i in ids if not res[i][0])
    return out


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        meteor = Meteor()  # a Java subprocess
    except OSError as e:
        raise ScoringError(f"METEOR runs Java, which could not start ({e.strerror or e}); "
                           "`make java` installs it") from None
    try:
        return float(meteor.compute_score(gts, res)[0])
    except ValueError as e:  # the Java side died: readline() gave nothing to parse
        raise ScoringError(f"METEOR's Java process failed ({e})") from None
    finally:
        del meteor  # its __del__ ends the Java process now, not at interpreter exit


def _spice(gts, res) -> float:
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001 - a download, a Java run: many ways to fail, one line to say
        raise ScoringError(f"SPICE could not run (it downloads Stanford CoreNLP on first use): "
                           f"{type(e).__name__}: {str(e).strip()[:200]}") from None


# --------------------------------------------------------------------- attention correctness
def cell_coverage(bbox, width: float, height: float, grid: int = GRID) -> np.ndarray:
    """[grid*grid] (row-major, as the encoder flattens its map): the fraction of
    each cell's area inside the box [x, y, w, h] given in image pixels.

    The encoder stretches the image to 299x299 without keeping its aspect ratio, so
    the grid splits width and height each into `grid` equal parts. Fractional cover
    rather than centre-in-box: a box of 1.5 cells counts as 1.5, not 1 or 2, so the
    chance level is exactly the box's share of the image.
    """
    x, y, w, h = (float(v) for v in bbox)
    edges = np.arange(grid + 1, dtype=np.float64)

    def overlap(lo, hi):  # per grid interval [k, k+1]: the length inside [lo, hi]
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, 1.0)

    cols = overlap(x / width * grid, (x + w) / width * grid)
    rows = overlap(y / height * grid, (y + h) / height * grid)
    return np.outer(rows, cols).reshape(-1)


def load_instances(path: str) -> dict:
    """A COCO instances file -> {"images": {image_id: {"width", "height", "objects"}},
    "vocabulary": every word that names some object}. An object is
    {"name", "colour" (scene set only, else None), "bbox", "words"}: its words are its
    category name's words plus its colour, normalised like captions."""
    data = fileio.read_json(path)
    cats = {c["id"]: c["name"] for c in data["categories"]}
    cat_words = dict(zip(cats, text_lib.words(list(cats.values()))))
    images = {int(im["id"]): {"width": float(im["width"]), "height": float(im["height"]), "objects": []}
              for im in data["images"]}
    vocabulary = set()
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        colour = ann.get("colour")
        words = set(cat_words[ann["category_id"]]) | ({colour} if colour else set())
        vocabulary |= words
        images[int(ann["image_id"])]["objects"].append(
            {"name": cats[ann["category_id"]], "colour": colour, "bbox": ann["bbox"], "words": words})
    return {"images": images, "vocabulary": vocabulary}


def _object_word(word: str, vocabulary: set) -> str | None:
    if word in vocabulary:
        return word
    if word.endswith("s") and word[:-1] in vocabulary:  # "circles" -> "circle"
        return word[:-1]
    return None


def named_objects(words: list[str], objects: list[dict], vocabulary: set) -> list[list[int] | None]:
    """Per word: None when it names no kind of object, else the indices of the
    image's objects it names (may be empty, or several: the caller decides).

    A run of object words is read as one phrase ("red circle", "hot dog"), so in a
    scene with a red circle and a red square, the "red" of "red circle" names the
    circle alone. When no object fits the whole phrase (the caption is wrong), each
    word names the objects that fit it alone.
    """
    out: list[list[int] | None] = [None] * len(words)
    stems = [_object_word(w, vocabulary) for w in words]
    i = 0
    while i < len(words):
        if stems[i] is None:
            i += 1
            continue
        j = i
        while j < len(words) and stems[j] is not None:
            j += 1
        phrase = stems[i:j]
        whole = [k for k, o in enumerate(objects) if all(w in o["words"] for w in phrase)]
        for t in range(i, j):
            out[t] = whole or [k for k, o in enumerate(objects) if stems[t] in o["words"]]
        i = j
    return out


class AttentionCorrectness:
    """Share of a word's attention on the object it names, against chance.

    Only words that name exactly one object of their image count: a word naming no
    object there (a wrong word) has no right place to look, and one naming several
    (two red shapes, three people) could rightly look at any of them, so both are
    counted as skipped rather than scored. Shares are averaged over words; chance is
    the share uniform attention would give (covered cells / 64), averaged the same way.
    """

    def __init__(self, instances: dict):
        self.images, self.vocabulary = instances["images"], instances["vocabulary"]
        self.shares, self.chances = [], []
        self.skipped = Counter()

    def add(self, image_id: int, words: list[str], attention: np.ndarray) -> None:
        image = self.images.get(int(image_id))
        if image is None:
            self.skipped["images_without_boxes"] += 1
            return
        objects = image["objects"]
        for targets, weights in zip(named_objects(words, objects, self.vocabulary), attention):
            if targets is None:
                continue
            if len(targets) != 1:
                self.skipped["words_naming_no_object" if not targets else "words_naming_several_objects"] += 1
                continue
            cover = cell_coverage(objects[targets[0]]["bbox"], image["width"], image["height"])
            self.shares.append(float(np.dot(np.asarray(weights, np.float64), cover)))
            self.chances.append(float(cover.sum() / cover.size))

    def summary(self) -> dict:
        share = float(np.mean(self.shares)) if self.shares else None
        chance = float(np.mean(self.chances)) if self.chances else None
        return {"words": len(self.shares), "share": share, "chance": chance,
                "ratio": share / chance if share is not None and chance else None,
                "skipped": dict(self.skipped), "cells": "fraction of each 8x8 cell's area inside the box"}


class ExactObjects:
    """Scene set: does the caption name exactly the image's (colour, shape) objects?
    Split by the number of objects, since multi-object scenes are where captioners fail."""

    def __init__(self, instances: dict):
        self.images = instances["images"]
        self.counts = defaultdict(lambda: [0, 0])  # objects in the scene -> [images, exact]

    def add(self, image_id: int, caption: str) -> None:
        image = self.images.get(int(image_id))
        if image is None:
            return
        truth = {(o["colour"], o["name"]) for o in image["objects"]}
        row = self.counts[len(image["objects"])]
        row[0] += 1
        row[1] += synthetic.objects_in_caption(caption) == truth

    def summary(self) -> dict:
        out = {str(n): {"images": t, "exact": e, "share": e / t} for n, (t, e) in sorted(self.counts.items())}
        total, exact = sum(t for t, _ in self.counts.values()), sum(e for _, e in self.counts.values())
        out["all"] = {"images": total, "exact": exact, "share": exact / total if total else None}
        return out


def has_colours(instances: dict) -> bool:
    objects = [o for im in instances["images"].values() for o in im["objects"]]
    return bool(objects) and all(o["colour"] for o in objects)


# ------------------------------------------------------------------- where the source lives
def default_image_dirs(meta: dict, split: str) -> list[str]:
    """Folders that may hold the split's images, from metadata.json's "source"."""
    source = meta.get("source") or {}
    kind, path = source.get("kind"), source.get("path")
    if kind == "coco" and path:
        return [fileio.join(path, f"{split}{source.get('year', '2014')}")]
    if kind == "karpathy" and source.get("images_dir"):
        # Karpathy's val and test images come from COCO's val2014 (restval from it too).
        base = source["images_dir"]
        return [fileio.join(base, "val2014"), fileio.join(base, "train2014"), base]
    if kind == "jsonl" and path:
        return [path.rsplit("/", 1)[0] if "/" in path else "."]  # file names are relative to it
    return []


def default_instances(meta: dict, split: str) -> list[str]:
    source = meta.get("source") or {}
    if source.get("kind") == "coco" and source.get("path"):
        return [fileio.join(source["path"], "annotations", f"instances_{split}{source.get('year', '2014')}.json")]
    if source.get("kind") == "karpathy" and source.get("images_dir"):
        return [fileio.join(source["images_dir"], "annotations", "instances_val2014.json")]
    return []


# ------------------------------------------------------------------------- the evaluation run
def caption_split(model, files: list[str], beam_size: int, max_length: int, batch_size: int = 32):
    """Per image of the shards, in order: {"image_id", "file_name", "references",
    "caption", "words", "attention" [len(words), 64]}. Streams: a COCO-sized split
    never holds more than one batch of feature maps."""
    import tensorflow as tf

    from caption_io import records

    from caption_serving.caption import FIRST_WORD_ID

    fn = model.signatures["caption_features"]
    ds = tf.data.TFRecordDataset(files).batch(batch_size).map(records.parse_examples)
    for batch in ds:
        out = fn(features=tf.cast(batch["features"], tf.float32), beam_size=tf.constant(beam_size, tf.int32),
                 max_length=tf.constant(max_length, tf.int32))
        out = {k: v.numpy() for k, v in out.items()}
        texts = batch["caption_text"].to_list()
        for i, image_id in enumerate(batch["image_id"].numpy()):
            caption = out["captions"][i].decode("utf-8")
            # The caption's words are the non-special tokens in order (as in caption_serving.caption).
            keep = out["tokens"][i] >= FIRST_WORD_ID
            yield {"image_id": int(image_id), "file_name": batch["file_name"][i].numpy().decode("utf-8"),
                   "references": [t.decode("utf-8") for t in texts[i]], "caption": caption,
                   "words": caption.split(), "attention": out["attention"][i][keep]}


def evaluate(model_dir: str, data_dir: str | None = None, split: str = "val", beam_size: int = 3,
             max_length: int | None = None, output: str | None = None, images_dir: str | None = None,
             instances: str | None = None, gallery_size: int = 12, spice: bool = False,
             batch_size: int = 32) -> dict:
    """Run the whole evaluation, write its files, return metrics.json's content."""
    from trainer import data
    from caption_eval import gallery
    from caption_io import jobdir
    from caption_serving.caption import EXPORT_INFO, load_model

    model, info = load_model(model_dir)
    if "caption_features" not in model.signatures:
        raise UsageError(f"--model {model_dir}: no caption_features signature (re-export with caption_serving.export)")
    if not data_dir:
        try:
            data_dir = jobdir.recorded_data(info, fileio.join(model_dir, EXPORT_INFO), model_dir)
        except jobdir.RecordedPathError as e:
            raise UsageError(str(e)) from None
    meta = data.load_metadata(data_dir)
    files = data.shard_files(data_dir, split, meta)
    max_length = max_length or int(info.get("default_max_length", 20))
    # Beside the export: JOB_DIR/export -> JOB_DIR/eval-val.
    parent = model_dir.rstrip("/").rsplit("/", 1)[0] if "/" in model_dir.rstrip("/") else "."
    output = output or fileio.join(parent, f"eval-{split}")

    if instances:
        if not fileio.exists(instances):
            raise UsageError(f"--instances {instances}: no such file")
        boxes_from = instances
    else:
        boxes_from = next((p for p in default_instances(meta, split) if fileio.exists(p)), None)
    boxes = load_instances(boxes_from) if boxes_from else None
    attention = AttentionCorrectness(boxes) if boxes else None
    exact = ExactObjects(boxes) if boxes and has_colours(boxes) else None

    results, references, shown = [], {}, []
    total = int(meta["splits"].get(split, {}).get("images", {}).get("written", 0)) or None
    start = time.time()
    for n, item in enumerate(caption_split(model, files, beam_size, max_length, batch_size), 1):
        results.append({"image_id": item["image_id"], "caption": item["caption"]})
        references[item["image_id"]] = item["references"]
        if attention:
            attention.add(item["image_id"], item["words"], item["attention"])
        if exact:
            exact.add(item["image_id"], item["caption"])
        if len(shown) < gallery_size:
            shown.append(item)
        if n % (batch_size * 20) == 0:
            print(f"captioned {n}{f'/{total}' if total else ''} images ({time.time() - start:.0f}s)", file=sys.stderr)

    caption_seconds = time.time() - start
    try:
        metrics = score(results, references, spice=False)
    except ValueError as e:  # the shards hold an image twice, or one without captions
        raise UsageError(f"--data {data_dir}, {split} split: {e}") from None
    spice_error = None
    if spice:
        try:
            metrics["SPICE"] = _spice(*_prepare(results, references))
        except ScoringError as e:
            spice_error, metrics["SPICE"] = str(e), None
    metrics.update({"split": split, "beam_size": beam_size, "max_length": max_length, "model": model_dir,
                    "data": data_dir, "text_normalisation": "caption_io.text.normalize (tensorflow-text)",
                    "caption_seconds": round(caption_seconds, 1),
                    "score_seconds": round(time.time() - start - caption_seconds, 1)})
    metrics["instances"] = boxes_from
    if not boxes:
        looked = ", ".join(default_instances(meta, split)) or "nowhere: the data's source has no COCO layout"
        metrics["instances_note"] = f"no object boxes, so no attention figures (looked {looked}; pass --instances)"
    metrics["attention_correctness"] = attention.summary() if attention else None
    metrics["exact_objects"] = exact.summary() if exact else None
    if spice_error:
        metrics["spice_error"] = spice_error

    metrics["output"] = output
    fileio.write_json(fileio.join(output, "results.json"), results)
    if gallery_size > 0:
        dirs = [images_dir] if images_dir else default_image_dirs(meta, split)
        sizes = {i: (im["width"], im["height"]) for i, im in boxes["images"].items()} if boxes else {}
        metrics["gallery"] = gallery.write(fileio.join(output, "gallery"), shown, dirs, sizes, table(metrics))
    fileio.write_json(fileio.join(output, "metrics.json"), metrics)
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
    if metrics.get("instances_note"):
        rows.append(("attention on object", metrics["instances_note"]))
    width = max(len(k) for k, _ in rows)
    head = (f"{metrics['split']}: {metrics['n_images']} images, beam {metrics['beam_size']}"
            f"{', ' + str(metrics['n_empty_captions']) + ' empty captions' if metrics['n_empty_captions'] else ''}")
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


class UsageError(ValueError):
    """A flag that points at something unusable (one readable line)."""


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m caption_eval.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SavedModel directory (JOB_DIR/export)")
    ap.add_argument("--data", help="the data directory (default: the one named in the export)")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--beam-size", type=int, default=3, help="1 is greedy decoding (default 3)")
    ap.add_argument("--max-length", type=int, default=0, help="most tokens a caption (default: the export's)")
    ap.add_argument("--output", help="default: EXPORT_DIR/../eval-SPLIT")
    ap.add_argument("--images-dir", help="where the split's images are (default: from the data's metadata.json)")
    ap.add_argument("--instances", help="a COCO instances JSON with object boxes "
                                        "(default: <coco>/annotations/instances_SPLIT2014.json)")
    ap.add_argument("--gallery", type=int, default=12, metavar="N", help="images in the gallery (default 12, 0: none)")
    ap.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP on first use)")
    ap.add_argument("--batch-size", type=int, default=32, help="images a model call (default 32)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.beam_size < 1 or a.max_length < 0 or a.gallery < 0 or a.batch_size < 1:
        ap.error("--beam-size and --batch-size must be >= 1, --max-length and --gallery >= 0")

    from trainer import data
    from caption_serving.caption import ModelError

    try:
        metrics = evaluate(a.model, a.data, a.split, a.beam_size, a.max_length or None, a.output, a.images_dir,
                           a.instances, a.gallery, a.spice, a.batch_size)
    except ModelError as e:
        print(f"error: --model {a.model}: {e}", file=sys.stderr)
        return 2
    except (UsageError, data.DataError, fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ScoringError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(metrics))
    print(f"results, metrics{' and gallery' if metrics.get('gallery') else ''} in {metrics['output']}")
    if metrics.get("spice_error"):
        print(f"error: {metrics['spice_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
