"""COCO (or your own captioned images) -> a data directory of sharded TFRecords.

    python -m pipelines.preprocess --coco-dir DIR --output DATA_DIR [options] [beam options]

Runs on Beam's DirectRunner by default and on Dataflow with
`--runner DataflowRunner --project P --region R --temp_location gs://... --setup_file ./setup.py`.

What it writes: {split}-SSSSS-of-NNNNN.tfrecord shards (one example per image:
float16 InceptionV3 features and all its captions; caption_io/records.py),
shards/ (what each finished shard holds), vocab.txt (built from the training
split), feature_stats.npz (per-channel mean and std over the training split),
encoder/ (the weights that made the features), inputs/ (the manifest of what
was read), rejected/ (every input that could not be used, with its reason) and,
last, metadata.json. A directory without metadata.json is an unfinished run:
the same command resumes it, keeping the shards it finished.

The transforms live in pipelines/transforms/; this module owns the flags, the
launcher's work before the pipeline (`prepare`) and the wiring (`build`).
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before TensorFlow is imported, below
    from caption_io import quiet

    quiet.install()

import json
import logging
import os
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from caption_io import cli, datadir, fileio, tokenizer
from caption_io import metadata as metadata_lib
from caption_io import vocab as vocab_lib
from model import backbones, precision
from pipelines import launcher, shards, sources
from pipelines.launcher import UsageError
from pipelines.transforms import check, encode, metadata, stats, vocabulary

log = logging.getLogger("pipelines.preprocess")

# The data directory's names are caption_io.datadir's; these keep them readable through this module.
STATS_FILE = datadir.STATS_FILE
METADATA_FILE = datadir.METADATA_FILE


# --------------------------------------------------------------------------- the pipeline


def build(p: beam.Pipeline, opts: dict) -> None:
    """Add the preprocessing transforms to `p` (tests drive this directly).

    Two passes over the images, so that no image-sized data waits anywhere:
    CheckInputs (tokenise, decode each image once and drop the pixels) fixes
    what will be written and so the vocabulary; EncodeShards then reads,
    encodes and writes each shard, streaming, with the vocabulary ready.

    opts: output, splits {split: manifest path}, annotation_rejects (path), num_shards
    {split: n}, batch_size, total_images, vocab_size, min_count, tokenizer (the vocabulary's mode),
    encoder (the backbone), encoder_path, encoder_sha256, encoder_precision (float32 or bfloat16),
    static (the planned caption_io.metadata.Metadata, which WriteMetadata completes).
    """
    out = opts["output"]
    annotation_rejects = (p | "ReadAnnotationRejects" >> beam.io.ReadFromText(opts["annotation_rejects"])
                          | "ParseAnnotationRejects" >> beam.Map(json.loads))
    entries = ([p | f"Read[{split}]" >> beam.io.ReadFromText(manifest) for split, manifest in opts["splits"].items()]
               | "Manifests" >> beam.Flatten()
               | "Parse" >> beam.Map(json.loads)
               # Spread the work: ReadFromText of one small file is a single split.
               | "Reshuffle" >> beam.Reshuffle())
    checked = entries | "CheckInputs" >> check.CheckInputs()
    vocab = checked["ok"] | "Vocabulary" >> vocabulary.BuildVocabulary(
        opts["tokenizer"], opts["vocab_size"], opts["min_count"])
    written = checked["ok"] | "EncodeShards" >> encode.EncodeShards(
        out, opts["num_shards"], vocab, opts["tokenizer"], opts["encoder"], opts["encoder_path"],
        opts["encoder_sha256"], opts["batch_size"], opts["total_images"], opts["encoder_precision"])
    summaries = written["shards"]

    rejects = (annotation_rejects, checked["rejected"], written["rejected"]) | "AllRejects" >> beam.Flatten()
    rejects_written = (rejects
                       | "RejectsToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
                       | "WriteRejects" >> beam.io.WriteToText(fileio.join(out, datadir.REJECTS_PREFIX),
                                                               file_name_suffix=".jsonl", num_shards=1))
    events = [annotation_rejects | "SeenAnnotations" >> beam.FlatMap(metadata.annotation_seen_events),
              entries | "Seen" >> beam.FlatMap(metadata.seen_events),
              rejects | "RejectedEvents" >> beam.FlatMap(metadata.rejected_events),
              summaries | "WrittenEvents" >> beam.FlatMap(metadata.written_events)]
    counts = events | "AllEvents" >> beam.Flatten() | "Count" >> beam.CombinePerKey(sum)
    channel_stats = (summaries | "TrainStats" >> beam.FlatMap(
                         lambda s: [stats.from_json(s["stats"])] if s["split"] == "train" else [])
                     | "ChannelStats" >> beam.CombineGlobally(stats.MergeChannelStats()))
    (p | "Once" >> beam.Create([None])
     | "WriteMetadata" >> beam.ParDo(metadata.WriteMetadata(out, opts["static"]), beam.pvalue.AsSingleton(vocab),
                                     beam.pvalue.AsSingleton(channel_stats), beam.pvalue.AsDict(counts),
                                     beam.pvalue.AsList(summaries), beam.pvalue.AsList(rejects_written)))


# --------------------------------------------------------------------------- the command


def parse_args(argv):
    ap = cli.Parser(
        prog="python -m pipelines.preprocess", description=__doc__.split("\n\n")[0],
        epilog="Other flags go to Beam (e.g. --runner DataflowRunner --project P --region R "
               "--temp_location gs://B/tmp --setup_file ./setup.py, or --direct_num_workers 2 "
               "--direct_running_mode multi_processing).")
    src = ap.add_argument_group("input")
    src.add_argument("--coco-dir",
                     help="COCO layout: annotations/captions_{train,val}{2014|2017}.json and image folders")
    src.add_argument("--year", choices=["2014", "2017"], help="COCO release (default: whichever --coco-dir holds)")
    src.add_argument("--karpathy-json",
                     help="Karpathy split file (train+restval -> train, val, test); images under --coco-dir")
    src.add_argument("--captions-jsonl", help='your own data: lines of {"image": path, "caption": text[, "split": s]}')
    src.add_argument("--val-fraction", type=float, default=0.05,
                     help="--captions-jsonl lines without a split: share put in val")
    src.add_argument("--max-captions", type=int,
                     help="keep a seeded random subset of N training captions, with their images")
    ap.add_argument("--output", required=True, help="the data directory to write (local or gs://)")
    ap.add_argument("--tokenizer", default=tokenizer.DEFAULT, choices=tokenizer.MODES,
                    help="what a token is: words (split on spaces), chars (characters) or wordpiece (word "
                         "pieces learned from the training captions); in every mode a Chinese or Japanese "
                         "character is a token of its own")
    ap.add_argument("--vocab-size", type=int, default=5000,
                    help="most frequent training words (or characters, or the word pieces learned) kept, "
                         "plus 4 special tokens")
    ap.add_argument("--min-count", type=int, default=1,
                    help="words (characters; wordpiece: pieces) seen fewer times are left out of the vocabulary")
    ap.add_argument("--encoder", default=backbones.DEFAULT, choices=backbones.NAMES,
                    help="the image encoder (keras.applications, without its top): its last convolutional grid "
                         "is the features")
    ap.add_argument("--encoder-weights", default="imagenet",
                    help="imagenet | random | PATH to the --encoder's weights (no top, as the data directory's "
                         "encoder/ holds them)")
    precision.add_flag(ap, "measured on this machine before the pipeline starts (on Dataflow: float32, unmeasured)")
    ap.add_argument("--seed", type=int, default=0, help="seed for random encoder weights and --max-captions")
    ap.add_argument("--num-shards", default="8",
                    help="shards per split: N, or split=N,... (e.g. train=64,val=4,test=4)")
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
    args.runner = launcher.runner_of(PipelineOptions(beam_args))
    return args, beam_args


def _parse_shards(spec: str) -> dict:
    try:
        if "=" not in spec:
            n = int(spec)
            shards = {s: n for s in datadir.SPLITS}
        else:
            shards = {}
            for part in spec.split(","):
                split, _, n = part.partition("=")
                if split.strip() not in datadir.SPLITS:
                    raise UsageError(f"--num-shards: unknown split {split.strip()!r} (train, val, test)")
                shards[split.strip()] = int(n)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--num-shards: expected N or split=N,..., got {spec!r}") from None
    if any(n < 1 for n in shards.values()):
        raise UsageError(f"--num-shards: each split needs at least 1 shard, got {spec!r}")
    return shards


def _prepare_output(out: str, overwrite: bool, planned: set[str]) -> None:
    """Refuse a finished data set unless --overwrite; clear it with --overwrite.

    A directory this command wrote without finishing (no metadata.json: killed,
    crashed, out of disk) is resumed instead: what the run left half-done goes,
    as do shards of another plan, and finished shards stay for EncodeShard to
    keep if their inputs are unchanged (pipelines.shards).
    """
    if not fileio.exists(out):
        return
    files = fileio.list_files(out)
    top = {f: f[len(out) + 1:] for f in files}
    ours = [f for f, rel in top.items() if datadir.is_shard_name(rel) or rel == datadir.METADATA_FILE]
    started = any(datadir.in_folder(rel, datadir.DONE_DIR, datadir.INPUTS) for rel in top.values())
    finished = fileio.exists(fileio.join(out, datadir.METADATA_FILE))
    if ours and not overwrite and (finished or not started):
        raise UsageError(f"--output {out} already holds a data set ({os.path.basename(ours[0])}, ...); "
                         "pass --overwrite to replace it")
    if overwrite:
        for f, rel in top.items():
            if f in ours or datadir.in_folder(rel, datadir.REJECTED, datadir.DONE_DIR):
                fileio.remove(f)
        shards.remove_leftovers(out)
        return
    if not started:
        return
    left = shards.remove_leftovers(out)
    planned_done = {shards.done_path(out, name) for name in planned}
    stale = [f for f, rel in top.items()
             if (datadir.is_shard_name(rel) and rel not in planned)
             or (datadir.in_folder(rel, datadir.DONE_DIR) and f not in planned_done)
             or datadir.in_folder(rel, datadir.REJECTED)]
    for f in stale:
        if fileio.exists(f):
            fileio.remove(f)
    done = sum(1 for rel in top.values() if datadir.in_folder(rel, datadir.DONE_DIR) and rel.endswith(".json"))
    log.info("resuming the unfinished run in %s: %d finished shard(s) are kept where their inputs are "
             "unchanged; removed %d partial file(s) and %d stale file(s)", out, done, left, len(stale))


def _read_annotations(args) -> tuple[dict, list, dict]:
    """-> (entries by split, annotation rejects, the source's description) from whichever input
    the flags name: JSON lines, a Karpathy split or COCO's own annotations."""
    if args.captions_jsonl:
        return sources.jsonl(args.captions_jsonl, args.val_fraction)
    if args.karpathy_json:
        return sources.karpathy(args.coco_dir, args.karpathy_json)
    if not fileio.exists(args.coco_dir):
        raise UsageError(f"--coco-dir {args.coco_dir} does not exist")
    return sources.coco(args.coco_dir, args.year)


def _plan_splits(args, entries: dict) -> tuple[dict, metadata_lib.MaxCaptions | None, set[str]]:
    """-> (the splits to write with their entries, --max-captions' record or None, the planned shard
    names). Subsamples the training captions and assigns every entry its shard, in place."""
    if not entries.get("train"):
        raise sources.SourceError("the input has no training image with a caption")
    max_captions = None
    if args.max_captions:
        available = sum(len(e["captions"]) for e in entries["train"])
        entries["train"] = sources.subsample_captions(entries["train"], args.max_captions, args.seed)
        max_captions = metadata_lib.MaxCaptions(kept=args.max_captions, available=available, seed=args.seed)
    splits = {s: e for s, e in entries.items() if e or s == "train"}
    missing = [s for s in splits if s not in args.num_shards]
    if missing:
        raise UsageError(f"--num-shards names no count for split {missing[0]!r}")
    for split, split_entries in splits.items():
        shards.assign(split_entries, args.num_shards[split])
    planned = {datadir.shard_name(s, i, args.num_shards[s]) for s in splits for i in range(args.num_shards[s])}
    return splits, max_captions, planned


def _fix_encoder(args, out: str) -> tuple:
    """Builds the encoder (--encoder with --encoder-weights, seeded) and saves it into the data
    directory, where export will load exactly these weights. -> (the model, its path, the digest of
    its weights)."""
    t = time.time()
    try:
        encoder = backbones.get(args.encoder).build(args.encoder_weights, args.seed)
    except backbones.EncoderWeightsError as e:
        raise UsageError(str(e)) from None
    encoder_path = fileio.join(out, datadir.encoder_file(args.encoder))
    backbones.save(encoder, encoder_path)
    encoder_digest = backbones.weights_sha256(encoder)
    log.info("encoder ready in %.1fs: %s", time.time() - t, encoder_path)
    return encoder, encoder_path, encoder_digest


def _write_manifests(out: str, splits: dict, rejects: list) -> tuple[dict, str]:
    """Each split's entries as a JSON-lines manifest, and the annotation rejects, in the data
    directory. -> ({split: manifest path}, the rejects' path)."""
    manifests = {}
    for split, split_entries in splits.items():
        manifests[split] = fileio.join(out, datadir.manifest(split))
        fileio.write_text(manifests[split], "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in split_entries))
    rejects_path = fileio.join(out, datadir.ANNOTATION_REJECTS)
    fileio.write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    return manifests, rejects_path


def _static_metadata(args, source: dict, max_captions, encoder_path: str, splits: dict,
                     compute: str) -> metadata_lib.Metadata:
    """metadata.json but what the pipeline counts (vocab.size, features.stats_count, the splits'
    counts and shard lists: zero here), which WriteMetadata fills in."""
    backbone = backbones.get(args.encoder)
    geometry = backbone.geometry
    return metadata_lib.Metadata(
        format_version=metadata_lib.FORMAT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=" ".join(["python -m pipelines.preprocess"] + list(args.argv)),
        source=metadata_lib.Source(**source, max_captions=max_captions),
        features=metadata_lib.Features(
            shape=geometry.feature_shape, dtype="float16", stats_file=datadir.STATS_FILE, stats_count=0,
            standardise="per channel, (x - mean) / std, statistics over the training split"),
        encoder=metadata_lib.Encoder(
            name=backbone.name, architecture=backbone.architecture, weights=args.encoder_weights,
            seed=args.seed if args.encoder_weights == "random" else None,
            file=datadir.encoder_file(backbone.name), sha256=fileio.sha256(encoder_path),
            input_size=geometry.input_size, input_scaling=backbone.input_scaling, grid=geometry.grid,
            channels=geometry.channels, precision=compute),
        vocab=metadata_lib.Vocab(file=datadir.VOCAB_FILE, size=0, max_words=args.vocab_size,
                                 min_count=args.min_count, specials=tuple(vocab_lib.SPECIALS), built_from="train",
                                 tokenizer=args.tokenizer),
        splits={s: metadata.planned_split(args.num_shards[s], datadir.shard_pattern(s)) for s in splits},
        rejected=datadir.folder(datadir.REJECTED),
        inputs=datadir.folder(datadir.INPUTS),
    )


def prepare(args) -> dict:
    """The launcher's work before the pipeline: validate, read the annotations
    into a manifest, fix the encoder weights. Returns the options for `build`."""
    # TensorFlow loads first (model.backbones imports it, at the top of this module): an install
    # that cannot import it fails before the output is touched.

    out = args.output.rstrip("/")
    entries, rejects, source = _read_annotations(args)
    splits, max_captions, planned = _plan_splits(args, entries)
    _prepare_output(out, args.overwrite, planned)
    encoder, encoder_path, encoder_digest = _fix_encoder(args, out)
    chosen = precision.choose(args.encoder_precision, measurable=not launcher.is_dataflow(args.runner),
                              work_speedup=lambda: precision.time_encoder(encoder))
    log.info("the encoder computes in %s", chosen.describe())
    manifests, rejects_path = _write_manifests(out, splits, rejects)
    static = _static_metadata(args, source, max_captions, encoder_path, splits, chosen.precision)
    return {"output": out, "splits": manifests, "annotation_rejects": rejects_path,
            "num_shards": {s: args.num_shards[s] for s in splits}, "batch_size": args.batch_size,
            "total_images": sum(len(e) for e in splits.values()),
            "vocab_size": args.vocab_size, "min_count": args.min_count, "tokenizer": args.tokenizer,
            "encoder": args.encoder,
            "encoder_path": encoder_path,
            "encoder_sha256": encoder_digest, "encoder_precision": chosen.precision, "static": static}


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
    runner = launcher.runner_of(options)
    launcher.check_remote_paths(runner, {"--output": args.output, "--coco-dir": args.coco_dir})
    launcher.validate_options(options, runner)
    opts = prepare(args)
    dry = launcher.run_pipeline(options, lambda p: build(p, opts))
    return dry or metadata_lib.read(opts["output"]).to_dict()


def summary(meta: dict | metadata_lib.Metadata, seconds: float) -> str:
    """The run's last line, from metadata.json's content (what `run` returns) or its Metadata."""
    if not isinstance(meta, metadata_lib.Metadata):
        meta = metadata_lib.Metadata.from_dict(meta)
    parts = []
    for split, info in meta.splits.items():
        parts.append(f"{split} {info.images.written} images/{info.captions.written} captions")
    rej_i = sum(i.images.rejected for i in meta.splits.values())
    rej_c = sum(i.captions.rejected for i in meta.splits.values())
    return (f"wrote {', '.join(parts)}; vocabulary {meta.vocab.size} tokens; "
            f"rejected {rej_i} images and {rej_c} captions (see {datadir.folder(datadir.REJECTED)}); {seconds:.0f}s")


@cli.command(interrupted="interrupted; run the same command again: it keeps the shards already written "
                          "and does the rest")
def main(argv=None) -> int:
    launcher.quiet_beam_logging()  # logging itself is set up by cli.command, as for every command
    t = time.time()
    try:
        meta = run(argv)
    except fileio.WriteError as e:  # the line says what to do next; exit 2 (WriteError's)
        where = launcher.without_step(e)
        raise fileio.WriteError(f"{where}; free some space and run the same command again: it keeps the shards "
                                "already written and does the rest", e.path, e.errno) from None
    if meta.get("dry_run"):
        print(launcher.DRY_RUN_LINE.format(runner=meta["runner"]))
        return 0
    print(summary(meta, time.time() - t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
