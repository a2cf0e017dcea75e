"""COCO (or your own captioned images) -> a data directory of sharded TFRecords.

    python -m pipelines.preprocess --coco-dir DIR --output DATA_DIR [options] [beam options]

Runs on Beam's DirectRunner by default and on Dataflow with
`--runner DataflowRunner --project P --region R --temp_location gs://... --setup_file ./setup.py`.

What it writes (see ARCHITECTURE.md): {split}-SSSSS-of-NNNNN.tfrecord shards
(one example per image: float16 InceptionV3 features and all its captions),
vocab.txt (built from the training split), feature_stats.npz (per-channel mean
and std over the training split), encoder/ (the weights that made the
features), inputs/ (the manifest of what was read), rejected/ (every input
that could not be used, with its reason) and metadata.json.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from . import cli, fileio, records, sources
from . import vocab as vocab_lib

log = logging.getLogger("pipelines.preprocess")

FORMAT_VERSION = 1
ENCODER_FILE = "encoder/inception_v3.weights.h5"
STATS_FILE = "feature_stats.npz"
METADATA_FILE = records.METADATA_FILE
NAMESPACE = "captioner"


class UsageError(ValueError):
    """A bad flag: reported as one line, exit code 2."""


# --------------------------------------------------------------------------- DoFns


class TokenizeCaptions(beam.DoFn):
    """Batches of manifest entries -> entries whose captions carry their words.

    Captions with no words after normalisation are rejected; an image left with
    no caption is rejected before it costs an encoder pass.
    """

    def setup(self):
        from . import text  # TensorFlow import: once per worker, not at pipeline build

        self._words = text.words

    def process(self, batch):
        texts = [c["text"] for e in batch for c in e["captions"]]
        all_words = iter(self._words(texts))
        for entry in batch:
            kept = []
            for cap in entry["captions"]:
                words = next(all_words)
                if words:
                    kept.append(dict(cap, words=words))
                else:
                    Metrics.counter(NAMESPACE, "captions_rejected").inc()
                    yield beam.pvalue.TaggedOutput("rejected", sources.reject(
                        entry["split"], "caption", {"id": cap["id"], "image_id": entry["image_id"], "caption": cap["text"]},
                        "blank caption (no words after normalisation)", captions=1))
            if kept:
                yield dict(entry, captions=kept)
            else:
                Metrics.counter(NAMESPACE, "images_rejected").inc()
                yield beam.pvalue.TaggedOutput("rejected", sources.reject(
                    entry["split"], "image", _describe(entry), "no usable caption", images=1))


def _describe(entry) -> dict:
    return {"image_id": entry["image_id"], "file_name": entry["file_name"], "path": entry["path"]}


def _read_pixels(entry):
    """(pixels, None) or (None, reason) for an entry's image file."""
    from apache_beam.io.filesystems import FileSystems

    from . import images

    try:
        with FileSystems.open(entry["path"]) as f:
            return images.decode(f.read()), None
    except images.ImageError as e:
        return None, str(e)
    except (OSError, IOError, beam.io.filesystem.BeamIOError) as e:
        return None, f"missing or unreadable file ({type(e).__name__}: {str(e)[:200]})"


def _image_reject(entry, reason):
    Metrics.counter(NAMESPACE, "images_rejected").inc()
    Metrics.counter(NAMESPACE, "captions_rejected").inc(len(entry["captions"]))
    return beam.pvalue.TaggedOutput("rejected", sources.reject(
        entry["split"], "image", dict(_describe(entry), captions=[c["text"] for c in entry["captions"]]),
        reason, images=1, captions=len(entry["captions"])))


class CheckImage(beam.DoFn):
    """Entry -> the same entry if its image decodes, else a reject with the reason.

    A separate pass from LoadPixels so that the vocabulary can be counted over
    exactly the captions that will be written without holding any pixels: the
    records need the vocabulary, and decoding is ~1% of an encoder pass.
    """

    def process(self, entry):
        _, reason = _read_pixels(entry)
        yield entry if reason is None else _image_reject(entry, reason)


class LoadPixels(beam.DoFn):
    """Entry -> (entry, [299, 299, 3] scaled pixels)."""

    def setup(self):
        from model import inception

        self._prepare = inception.prepare

    def process(self, entry):
        pixels, reason = _read_pixels(entry)
        if reason is not None:  # the file changed since CheckImage read it
            yield _image_reject(entry, reason)
            return
        # Resize here, per image (sizes differ), so the encoder gets uniform batches.
        yield entry, self._prepare(pixels[None]).numpy()[0]


class _LoadedEncoder:
    """The encoder and its compiled call, shared by all threads of a worker process."""

    def __init__(self, weights_path):
        import tensorflow as tf

        from model import inception

        self.model = inception.load(weights_path)
        # One trace for every batch size: the input signature leaves it open.
        self.call = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True,
                                input_signature=[tf.TensorSpec([None, inception.INPUT_SIZE, inception.INPUT_SIZE, 3], tf.float32)])


class EncodeImages(beam.DoFn):
    """Batches of (entry, pixels) -> (entry, float16 [64, 2048] features).

    The model is loaded once per worker process (beam.utils.shared), not once
    per element or per DoFn instance.
    """

    def __init__(self, weights_path: str, shared_handle, total: int):
        self._weights_path = weights_path
        self._shared = shared_handle
        self._total = total  # images in the whole run, for the progress line

    def setup(self):
        path = self._weights_path
        self._encoder = self._shared.acquire(lambda: _LoadedEncoder(path))
        self._count = 0
        self._start = self._last_log = time.time()

    def process(self, batch):
        entries = [e for e, _ in batch]
        pixels = np.stack([p for _, p in batch])
        features = self._encoder.call(pixels).numpy().astype(np.float16)
        Metrics.counter(NAMESPACE, "images_encoded").inc(len(entries))
        self._count += len(entries)
        now = time.time()
        if now - self._last_log > 15:  # a line a user can follow on a long local run
            self._last_log = now
            log.info("encoded %d of %d images in this worker (%.1f images/s)", self._count, self._total,
                     self._count / (now - self._start))
        for entry, f in zip(entries, features):
            yield entry, f


class MakeRecord(beam.DoFn):
    """(entry, features) + vocabulary -> a serialised tf.train.Example."""

    def setup(self):
        self._index = None
        self._vocab_id = None

    def process(self, element, tokens):
        entry, features = element
        if self._vocab_id != id(tokens):  # the side input is one list; index it once
            self._index = {w: i for i, w in enumerate(tokens)}
            self._vocab_id = id(tokens)
        ids = [vocab_lib.encode(c["words"], self._index) for c in entry["captions"]]
        Metrics.counter(NAMESPACE, "images_written").inc()
        Metrics.counter(NAMESPACE, "captions_written").inc(len(ids))
        yield records.make_example(entry["image_id"], entry["file_name"], features, ids,
                                   [c["text"] for c in entry["captions"]])


class ChannelStats(beam.CombineFn):
    """Per-channel mean and standard deviation of [64, C] feature maps.

    Accumulates (count, mean, M2) per channel and merges with Chan et al.'s
    parallel update, which stays exact in float64 where sum-of-squares would
    cancel (the raw random-encoder features have std ~8e-4).
    """

    def create_accumulator(self):
        return (0, None, None)

    def add_input(self, acc, features):
        x = np.asarray(features, np.float64)
        return self.merge_accumulators([acc, (x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0))])

    def merge_accumulators(self, accs):
        n, mean, m2 = 0, None, None
        for bn, bmean, bm2 in accs:
            if bn == 0:
                continue
            if n == 0:
                n, mean, m2 = bn, bmean.copy(), bm2.copy()
                continue
            total = n + bn
            delta = bmean - mean
            mean = mean + delta * (bn / total)
            m2 = m2 + bm2 + delta ** 2 * (n * bn / total)
            n = total
        return (n, mean, m2)

    def extract_output(self, acc):
        n, mean, m2 = acc
        if n == 0:
            return None
        return {"count": n, "mean": mean.astype(np.float32), "std": np.sqrt(m2 / n).astype(np.float32)}


class WriteMetadata(beam.DoFn):
    """Once every side input is ready: vocab.txt, feature_stats.npz, metadata.json."""

    def __init__(self, output: str, static: dict):
        self._output = output
        self._static = static

    def process(self, _, tokens, stats, counts, longest):
        if stats is None:
            raise RuntimeError("no training image was written, so there are no feature statistics "
                               "(see the rejected/ records)")
        vocab_lib.write(fileio.join(self._output, vocab_lib.FILE_NAME), tokens)
        buf = io.BytesIO()
        np.savez(buf, mean=stats["mean"], std=stats["std"], count=np.int64(stats["count"]))
        fileio.write_bytes(fileio.join(self._output, STATS_FILE), buf.getvalue())
        meta = dict(self._static)
        meta["vocab"] = dict(meta["vocab"], size=len(tokens))
        meta["features"] = dict(meta["features"], stats_count=int(stats["count"]))
        for split, info in meta["splits"].items():
            for what in ("images", "captions"):
                got = {k: int(counts.get((split, what, k), 0)) for k in ("seen", "written", "rejected")}
                if got["seen"] != got["written"] + got["rejected"]:
                    raise RuntimeError(f"{split} {what}: seen {got['seen']} != written {got['written']} "
                                       f"+ rejected {got['rejected']}: an input was lost")
                info[what] = got
            info["max_tokens"] = int(longest.get(split, 0))
        fileio.write_json(fileio.join(self._output, METADATA_FILE), meta)
        yield meta


# --------------------------------------------------------------------------- the pipeline


def _events_from_entry(entry):
    yield (entry["split"], "images", "seen"), 1
    yield (entry["split"], "captions", "seen"), len(entry["captions"])


def _events_from_reject(rej):
    for what in ("images", "captions"):
        if rej[what]:
            yield (rej["split"], what, "rejected"), rej[what]


def _events_from_written(element):
    entry, _ = element
    yield (entry["split"], "images", "written"), 1
    yield (entry["split"], "captions", "written"), len(entry["captions"])


def _word_list(entry):
    for cap in entry["captions"]:
        yield from cap["words"]


def build(p: beam.Pipeline, opts: dict) -> None:
    """Add the preprocessing transforms to `p` (tests drive this directly).

    opts: output, splits {split: manifest path}, annotation_rejects (path), num_shards
    {split: n}, batch_size, total_images, vocab_size, min_count, encoder_path, static (metadata).
    """
    from apache_beam.utils import shared

    out = opts["output"]
    encoder_handle = shared.Shared()
    all_events, all_rejects, written_by_split, longest = [], [], {}, []

    annotation_rejects = (p | "ReadAnnotationRejects" >> beam.io.ReadFromText(opts["annotation_rejects"])
                          | "ParseAnnotationRejects" >> beam.Map(json.loads))
    all_rejects.append(annotation_rejects)
    all_events.append(annotation_rejects | "SeenRejectedAnnotations" >> beam.FlatMap(
        lambda r: [((r["split"], w, "seen"), r[w]) for w in ("images", "captions") if r[w]]))

    for split, manifest in opts["splits"].items():
        entries = (p | f"Read[{split}]" >> beam.io.ReadFromText(manifest)
                   | f"Parse[{split}]" >> beam.Map(json.loads)
                   # Spread the work: ReadFromText of one file is a single split.
                   | f"Reshuffle[{split}]" >> beam.Reshuffle())
        all_events.append(entries | f"Seen[{split}]" >> beam.FlatMap(_events_from_entry))
        tokenized = (entries
                     | f"BatchText[{split}]" >> beam.BatchElements(min_batch_size=64, max_batch_size=512)
                     | f"Tokenize[{split}]" >> beam.ParDo(TokenizeCaptions()).with_outputs("rejected", main="ok"))
        checked = tokenized.ok | f"CheckImage[{split}]" >> beam.ParDo(CheckImage()).with_outputs("rejected", main="ok")
        pixels = checked.ok | f"LoadPixels[{split}]" >> beam.ParDo(LoadPixels()).with_outputs("rejected", main="ok")
        encoded = (pixels.ok
                   | f"BatchImages[{split}]" >> beam.BatchElements(
                       min_batch_size=opts["batch_size"], max_batch_size=opts["batch_size"])
                   | f"Encode[{split}]" >> beam.ParDo(EncodeImages(opts["encoder_path"], encoder_handle, opts["total_images"])))
        all_rejects += [tokenized.rejected, checked.rejected, pixels.rejected]
        all_events.append(encoded | f"Written[{split}]" >> beam.FlatMap(_events_from_written))
        longest.append(encoded | f"Lengths[{split}]" >> beam.FlatMap(
            lambda el, s=split: [(s, len(c["words"]) + 2) for c in el[0]["captions"]]))
        written_by_split[split] = encoded
        if split == "train":
            words = checked.ok | "Words" >> beam.FlatMap(_word_list)
            vocab = (words | "CountWords" >> beam.combiners.Count.PerElement()
                     | "AllCounts" >> beam.combiners.ToDict()
                     | "SelectWords" >> beam.Map(vocab_lib.select_words, opts["vocab_size"], opts["min_count"]))
            stats = (encoded | "Features" >> beam.Map(lambda el: el[1])
                     | "ChannelStats" >> beam.CombineGlobally(ChannelStats()))

    vocab_side = beam.pvalue.AsSingleton(vocab)
    for split, encoded in written_by_split.items():
        (encoded
         | f"MakeRecord[{split}]" >> beam.ParDo(MakeRecord(), vocab_side)
         | f"WriteShards[{split}]" >> beam.io.WriteToTFRecord(
             records.shard_prefix(out, split), file_name_suffix=records.SHARD_SUFFIX,
             num_shards=opts["num_shards"][split], shard_name_template=records.SHARD_TEMPLATE))

    rejects = all_rejects | "AllRejects" >> beam.Flatten()
    all_events.append(rejects | "RejectEvents" >> beam.FlatMap(_events_from_reject))
    (rejects | "RejectsToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
     | "WriteRejects" >> beam.io.WriteToText(fileio.join(out, "rejected", "rejected"),
                                             file_name_suffix=".jsonl", num_shards=1))
    counts = all_events | "AllEvents" >> beam.Flatten() | "Count" >> beam.CombinePerKey(sum)
    longest = longest | "AllLengths" >> beam.Flatten() | "Longest" >> beam.CombinePerKey(max)
    (p | "Once" >> beam.Create([None])
     | "WriteMetadata" >> beam.ParDo(WriteMetadata(out, opts["static"]), vocab_side,
                                     beam.pvalue.AsSingleton(stats), beam.pvalue.AsDict(counts),
                                     beam.pvalue.AsDict(longest)))


# --------------------------------------------------------------------------- the command


def parse_args(argv):
    ap = cli.Parser(
        prog="python -m pipelines.preprocess", description=__doc__.split("\n\n")[0],
        epilog="Other flags go to Beam (e.g. --runner DataflowRunner --project P --region R "
               "--temp_location gs://B/tmp --setup_file ./setup.py, or --direct_num_workers 2 "
               "--direct_running_mode multi_processing).")
    src = ap.add_argument_group("input")
    src.add_argument("--coco-dir", help="COCO layout: annotations/captions_{train,val}{2014|2017}.json and image folders")
    src.add_argument("--year", choices=["2014", "2017"], help="COCO release (default: whichever --coco-dir holds)")
    src.add_argument("--karpathy-json", help="Karpathy split file (train+restval -> train, val, test); images under --coco-dir")
    src.add_argument("--captions-jsonl", help='your own data: lines of {"image": path, "caption": text[, "split": s]}')
    src.add_argument("--val-fraction", type=float, default=0.05, help="--captions-jsonl lines without a split: share put in val")
    src.add_argument("--max-captions", type=int, help="keep a seeded random subset of N training captions, with their images")
    ap.add_argument("--output", required=True, help="the data directory to write (local or gs://)")
    ap.add_argument("--vocab-size", type=int, default=5000, help="most frequent training words kept (plus 4 special tokens)")
    ap.add_argument("--min-count", type=int, default=1, help="words seen fewer times become <unk>")
    ap.add_argument("--encoder-weights", default="imagenet", help="imagenet | random | PATH to InceptionV3 (no top) weights")
    ap.add_argument("--seed", type=int, default=0, help="seed for random encoder weights and --max-captions")
    ap.add_argument("--num-shards", default="8", help="shards per split: N, or split=N,... (e.g. train=64,val=4,test=4)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    ap.add_argument("--overwrite", action="store_true", help="replace a data set already in --output")
    args, beam_args = ap.parse_known_args(argv)

    if not args.coco_dir and not args.captions_jsonl:
        raise UsageError("give --coco-dir (COCO layout or, with --karpathy-json, the images) or --captions-jsonl")
    if args.captions_jsonl and (args.coco_dir or args.karpathy_json):
        raise UsageError("--captions-jsonl cannot be combined with --coco-dir/--karpathy-json")
    for flag, value, low in (("--vocab-size", args.vocab_size, 1), ("--min-count", args.min_count, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-captions", args.max_captions, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    args.num_shards = _parse_shards(args.num_shards)
    return args, beam_args


def _parse_shards(spec: str) -> dict:
    try:
        if "=" not in spec:
            n = int(spec)
            shards = {s: n for s in records.SPLITS}
        else:
            shards = {}
            for part in spec.split(","):
                split, _, n = part.partition("=")
                if split.strip() not in records.SPLITS:
                    raise UsageError(f"--num-shards: unknown split {split.strip()!r} (train, val, test)")
                shards[split.strip()] = int(n)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--num-shards: expected N or split=N,..., got {spec!r}") from None
    if any(n < 1 for n in shards.values()):
        raise UsageError(f"--num-shards: each split needs at least 1 shard, got {spec!r}")
    return shards


def _clear_output(out: str, overwrite: bool) -> None:
    existing = [f for f in fileio.list_files(out) if f.endswith((records.SHARD_SUFFIX, METADATA_FILE))] \
        if fileio.exists(out) else []
    if existing and not overwrite:
        raise UsageError(f"--output {out} already holds a data set ({os.path.basename(existing[0])}, ...); "
                         "pass --overwrite to replace it")
    for f in existing if overwrite else []:
        fileio.remove(f)
    if overwrite and fileio.exists(fileio.join(out, "rejected")):
        for f in fileio.list_files(fileio.join(out, "rejected")):
            fileio.remove(f)


def _sha256(path: str) -> str:
    return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


def prepare(args) -> dict:
    """The launcher's work before the pipeline: validate, read the annotations
    into a manifest, fix the encoder weights. Returns the options for `build`."""
    from model import inception

    out = args.output.rstrip("/")
    if args.captions_jsonl:
        entries, rejects, source = sources.jsonl(args.captions_jsonl, args.val_fraction)
    elif args.karpathy_json:
        entries, rejects, source = sources.karpathy(args.coco_dir, args.karpathy_json)
    else:
        if not fileio.exists(args.coco_dir):
            raise UsageError(f"--coco-dir {args.coco_dir} does not exist")
        entries, rejects, source = sources.coco(args.coco_dir, args.year)
    if not entries.get("train"):
        raise sources.SourceError("the input has no training image with a caption")
    if args.max_captions:
        available = sum(len(e["captions"]) for e in entries["train"])
        entries["train"] = sources.subsample_captions(entries["train"], args.max_captions, args.seed)
        source["max_captions"] = {"kept": args.max_captions, "available": available, "seed": args.seed}
    splits = {s: e for s, e in entries.items() if e or s == "train"}
    missing = [s for s in splits if s not in args.num_shards]
    if missing:
        raise UsageError(f"--num-shards names no count for split {missing[0]!r}")

    _clear_output(out, args.overwrite)
    t = time.time()
    try:
        encoder = inception.build(args.encoder_weights, args.seed)
    except inception.EncoderWeightsError as e:
        raise UsageError(str(e)) from None
    encoder_path = fileio.join(out, ENCODER_FILE)
    inception.save(encoder, encoder_path)
    log.info("encoder ready in %.1fs: %s", time.time() - t, encoder_path)

    manifests = {}
    for split, split_entries in splits.items():
        manifests[split] = fileio.join(out, "inputs", f"{split}.jsonl")
        fileio.write_text(manifests[split], "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in split_entries))
    rejects_path = fileio.join(out, "inputs", "rejected-annotations.jsonl")
    fileio.write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))

    static = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m pipelines.preprocess"] + list(args.argv)),
        "source": source,
        "features": {"shape": list(records.FEATURE_SHAPE), "dtype": "float16", "stats_file": STATS_FILE,
                     "standardise": "per channel, (x - mean) / std, statistics over the training split"},
        "encoder": {"architecture": inception.ARCHITECTURE, "weights": args.encoder_weights,
                    "seed": args.seed if args.encoder_weights == "random" else None,
                    "file": ENCODER_FILE, "sha256": _sha256(encoder_path), "input_size": inception.INPUT_SIZE,
                    "input_scaling": "bilinear resize to 299x299, then x / 127.5 - 1"},
        "vocab": {"file": vocab_lib.FILE_NAME, "max_words": args.vocab_size, "min_count": args.min_count,
                  "specials": list(vocab_lib.SPECIALS), "built_from": "train"},
        "splits": {s: {"shards": args.num_shards[s], "pattern": f"{s}{records.SHARD_TEMPLATE}{records.SHARD_SUFFIX}"}
                   for s in splits},
        "rejected": "rejected/",
        "inputs": "inputs/",
    }
    return {"output": out, "splits": manifests, "annotation_rejects": rejects_path,
            "num_shards": {s: args.num_shards[s] for s in splits}, "batch_size": args.batch_size,
            "total_images": sum(len(e) for e in splits.values()),
            "vocab_size": args.vocab_size, "min_count": args.min_count, "encoder_path": encoder_path,
            "static": static}


def _check_remote_paths(args, runner: str) -> None:
    """Workers of a remote runner cannot read or write this machine's files."""
    if runner.rsplit(".", 1)[-1].lower().removesuffix("runner") != "dataflow":
        return
    for flag, value in (("--output", args.output), ("--coco-dir", args.coco_dir)):
        if value and not fileio.is_gcs(value):
            raise UsageError(f"{flag} {value}: Dataflow workers cannot reach this machine's files; give a gs:// path")


def _validate_beam_options(options, runner: str) -> None:
    """Beam's own checks of its flags (Dataflow: project, region, job name, gs://
    locations, worker counts), run before anything is written."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner

    try:
        errors = PipelineOptionsValidator(options, create_runner(runner)).validate()
    except ValueError as e:  # an unknown --runner
        raise UsageError(f"--runner {runner}: {str(e).split('. Valid values')[0]}") from None
    if errors:
        raise UsageError("Beam options: " + "; ".join(" ".join(e.split()) for e in errors))


def run(argv=None) -> dict:
    """Parse flags, run the pipeline to the end, return metadata.json's content.

    With Beam's `--dry_run=True` the pipeline is only translated for its runner
    (Dataflow: checked, pickled and turned into a job, nothing submitted): returns
    {"dry_run": True, "runner": ..., "pipeline": the job's pipeline proto}.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = parse_args(argv)
    args.argv = argv
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    _check_remote_paths(args, runner)
    _validate_beam_options(options, runner)
    opts = prepare(args)
    with beam.Pipeline(options=options) as p:
        build(p, opts)
    # (Runners that run here ignore --dry_run: they have run the pipeline.)
    job = getattr(p.runner, "job", None) if options.view_as(TestOptions).dry_run else None
    if job is not None:
        return {"dry_run": True, "runner": runner, "pipeline": job.proto_pipeline}
    return fileio.read_json(fileio.join(opts["output"], METADATA_FILE))


def summary(meta: dict, seconds: float) -> str:
    parts = []
    for split, info in meta["splits"].items():
        parts.append(f"{split} {info['images']['written']} images/{info['captions']['written']} captions")
    rej_i = sum(i["images"]["rejected"] for i in meta["splits"].values())
    rej_c = sum(i["captions"]["rejected"] for i in meta["splits"].values())
    return (f"wrote {', '.join(parts)}; vocabulary {meta['vocab']['size']} tokens; "
            f"rejected {rej_i} images and {rej_c} captions (see rejected/); {seconds:.0f}s")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # On Dataflow: the job id, its console link and its state changes, as they come.
    for name in ("apache_beam.runners.dataflow.internal.apiclient", "apache_beam.runners.dataflow.dataflow_runner"):
        logging.getLogger(name).setLevel(logging.INFO)
    t = time.time()
    try:
        meta = run(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sources.SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if meta.get("dry_run"):
        print(f"dry run: the pipeline was translated for {meta['runner']}; nothing was submitted")
        return 0
    print(summary(meta, time.time() - t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
