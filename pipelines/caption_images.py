"""Caption a folder, a glob or a list of images with an exported model, on Beam.

    python -m pipelines.caption_images --images PATTERN --model EXPORT --output OUT
           [--beam-size 3] [--batch-size 32] [--coco-results] [--encoder-precision auto] [beam options]
    python -m pipelines.caption_images --images-list FILE --model EXPORT --output OUT ...

PATTERN is a folder (its files), a glob or a gs:// glob; FILE holds one path a line
(relative ones are relative to FILE's folder). Runs on Beam's DirectRunner by default
and on Dataflow with the flags preprocessing takes (README, "Scaling out"); the model
goes through Beam's RunInference (pipelines/transforms/caption.py).

What it writes (the layout below is this command's output contract):
  OUT/captions-SSSSS-of-NNNNN.jsonl   {"image": path, "caption": text, "score": log-prob} a line
                                      (+ "captions": [{"caption", "score"}], best first, with
                                      --num-captions K > 1)
  OUT/rejected/rejected-SSSSS-of-NNNNN.jsonl   {"image": path, "reason": why} for each image
                                      that could not be captioned (not an image, truncated, ...)
  OUT/coco_results.json               with --coco-results: [{"image_id", "caption"}], ids from
                                      COCO file names (COCO_val2014_000000391895.jpg -> 391895)
  OUT/summary.json                    last: the counts (inputs = captioned + rejected, checked)
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before TensorFlow is imported, below
    from caption_io import quiet

    quiet.install()

import json
import logging
import os
import re
import sys
import time

import apache_beam as beam
from apache_beam.io import fileio as beam_fileio
from apache_beam.options.pipeline_options import PipelineOptions

from caption_io import cli, decoding_defaults, fileio, savedmodel
from caption_serving import client
from model import precision
from pipelines import launcher
from pipelines.launcher import UsageError
from pipelines.transforms import caption

log = logging.getLogger("pipelines.caption_images")

CAPTIONS = "captions"  # OUT/captions-SSSSS-of-NNNNN.jsonl
REJECTED = "rejected/rejected"
SUFFIX = ".jsonl"
COCO_RESULTS_FILE = "coco_results.json"
SUMMARY_FILE = "summary.json"
# A COCO file name ends in its zero-padded image id: COCO_val2014_000000391895.jpg, 000000391895.jpg.
COCO_ID = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


class CountsError(RuntimeError, cli.UserError):
    """Captioned + rejected differs from the images read: something was lost. Exit 1."""

    exit_code = 1


def coco_id(path: str) -> int | None:
    m = COCO_ID.search(os.path.basename(path))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the pipeline


def _listed(line: str, base: str) -> list[str]:
    """A line of --images-list -> its path (relative ones to the list's folder); blank: none."""
    path = line.strip()
    if not path:
        return []
    return [path if path.startswith("/") or "://" in path else fileio.join(base, path)]


def _paths(p: beam.Pipeline, opts: dict):
    """The input paths, read by the workers (a glob over millions of objects is never
    listed on the launcher nor carried in the job's graph)."""
    if opts["images_list"]:
        return (p | "ReadList" >> beam.io.ReadFromText(opts["images_list"])
                | "Paths" >> beam.FlatMap(_listed, opts["list_dir"]))
    return (p | "Match" >> beam_fileio.MatchFiles(opts["pattern"])
            | "Paths" >> beam.Map(lambda m: m.path))


class WriteSummary(beam.DoFn):
    """The run's last file: its counts, written only when they add up (inputs =
    captioned + rejected), after the caption and reject files are whole."""

    def __init__(self, out: str, static: dict):
        self._out = out
        self._static = static

    def process(self, _, inputs, captioned, rejected, caption_files, reject_files, coco_files):
        summary = dict(self._static, inputs=inputs, captioned=captioned, rejected=rejected,
                       caption_files=sorted(os.path.basename(f) for f in caption_files),
                       reject_files=sorted(os.path.relpath(f, self._out) if not fileio.is_gcs(f) else f
                                           for f in reject_files))
        if coco_files:
            summary["coco_results"] = COCO_RESULTS_FILE
        if captioned + rejected != inputs:
            raise CountsError(f"{inputs} images read but {captioned} captioned and {rejected} rejected; "
                              f"{self._out} is incomplete: run the same command again with --overwrite")
        fileio.write_json(fileio.join(self._out, SUMMARY_FILE), summary)
        yield summary


class WriteCocoResults(beam.DoFn):
    """All (image_id, caption) pairs -> coco_results.json, the list COCO's loadRes reads
    (one caption per id, sorted by id)."""

    def __init__(self, out: str):
        self._out = out

    def process(self, pairs):
        by_id = {}
        for image_id, _path, text in sorted(pairs):
            by_id.setdefault(image_id, text)  # the same id twice: the first path's caption
        path = fileio.join(self._out, COCO_RESULTS_FILE)
        fileio.write_json(path, [{"image_id": i, "caption": c} for i, c in sorted(by_id.items())])
        yield path


def _coco_pair(row: dict) -> list[tuple]:
    """A result row -> [(COCO image id, path, caption)], or [] when its file name holds no id."""
    image_id = coco_id(row["image"])
    return [] if image_id is None else [(image_id, row["image"], row["caption"])]


def _count(pcoll, label):
    return pcoll | label >> beam.combiners.Count.Globally()


def build(p: beam.Pipeline, opts: dict) -> None:
    """Add the captioning transforms to `p`.

    opts: pattern or images_list (+ list_dir), model, beam_size, max_length, controls
    (decoding's, as client.decoding_controls gives them), batch_size, model_copies, output,
    num_shards (0: the runner decides), coco_results, encoder_precision (auto, float32 or bfloat16:
    each worker decides at load), static (summary fields).
    """
    out = opts["output"]
    paths = _paths(p, opts) | "Reshuffle" >> beam.Reshuffle()  # spread the reads and the model calls
    handler = caption.CaptionHandler(opts["model"], opts["beam_size"], opts["max_length"], opts["batch_size"],
                                     opts["model_copies"], opts["controls"], opts["encoder_precision"])
    done = paths | "Caption" >> caption.CaptionImages(handler)
    rows, rejects = done["captioned"], done["rejected"]
    caption_files = (rows | "RowsToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
                     | "WriteCaptions" >> beam.io.WriteToText(fileio.join(out, CAPTIONS), file_name_suffix=SUFFIX,
                                                              num_shards=opts["num_shards"]))
    reject_files = (rejects | "RejectsToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
                    | "WriteRejects" >> beam.io.WriteToText(fileio.join(out, REJECTED), file_name_suffix=SUFFIX,
                                                            num_shards=1))
    if opts["coco_results"]:
        coco_files = (rows | "CocoIds" >> beam.FlatMap(_coco_pair)
                      | "AllPairs" >> beam.combiners.ToList()
                      | "WriteCocoResults" >> beam.ParDo(WriteCocoResults(out)))
    else:
        coco_files = p | "NoCocoResults" >> beam.Create([])
    (p | "Once" >> beam.Create([None])
     | "WriteSummary" >> beam.ParDo(
         WriteSummary(out, opts["static"]),
         beam.pvalue.AsSingleton(_count(paths, "CountInputs")),
         beam.pvalue.AsSingleton(_count(rows, "CountCaptioned")),
         beam.pvalue.AsSingleton(_count(rejects, "CountRejected")),
         beam.pvalue.AsList(caption_files), beam.pvalue.AsList(reject_files), beam.pvalue.AsList(coco_files)))


# --------------------------------------------------------------------------- the command


def parse_args(argv):
    ap = cli.Parser(prog="python -m pipelines.caption_images", description=__doc__.split("\n\n")[0],
                    epilog="Other flags go to Beam (e.g. --runner DataflowRunner --project P --region R "
                           "--temp_location gs://B/tmp --setup_file ./setup.py).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="PATTERN", help="a folder, a glob or a gs:// glob of image files")
    src.add_argument("--images-list", metavar="FILE", help="a file of image paths, one a line")
    ap.add_argument("--model", required=True, help="the export directory (JOB_DIR/export), local or gs://")
    ap.add_argument("--output", required=True, help="the folder to write (local or gs://)")
    ap.add_argument("--beam-size", type=int, default=decoding_defaults.BEAM_SIZE,
                    help=f"1 is greedy decoding (default {decoding_defaults.BEAM_SIZE})")
    ap.add_argument("--max-length", type=int, default=0, help="most tokens per caption (default: the export's)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    ap.add_argument("--model-copies", type=int, default=0,
                    help="models per worker machine, shared by its processes (GPU workers: 1 per GPU); "
                         "default 0: one per worker process")
    ap.add_argument("--num-shards", type=int, default=0, help="caption files (default 0: the runner decides)")
    ap.add_argument("--coco-results", action="store_true",
                    help="also write coco_results.json (image ids from COCO file names)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results already in --output")
    precision.add_flag(ap, "measured by each worker when it loads the model; where the choice is not the "
                           "export's, the worker encodes with the export's weights in it")
    client.add_decoding_flags(ap)
    args, beam_args = ap.parse_known_args(argv)
    for flag, value, low in (("--beam-size", args.beam_size, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-length", args.max_length, 0), ("--model-copies", args.model_copies, 0),
                             ("--num-shards", args.num_shards, 0)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    try:
        args.controls = client.decoding_controls(args, args.beam_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args, beam_args


def _input_pattern(images: str) -> str:
    """A folder (local, or a gs:// prefix with no object of its own) means its files; a
    relative local path is made absolute for the workers. The pattern must match a file."""
    from apache_beam.io.filesystems import FileSystems

    if not fileio.is_gcs(images):
        images = os.path.abspath(images)
    glob = any(c in images for c in "*?[")
    if os.path.isdir(images) or (fileio.is_gcs(images) and not glob and fileio.size(images) is None):
        images = fileio.join(images.rstrip("/"), "*")
    try:
        matched = FileSystems.match([images], limits=[1])[0].metadata_list
    except Exception as e:  # Beam's filesystems raise their own types; the line says why
        raise UsageError(f"--images {images}: cannot list ({str(e).splitlines()[0][:200]})") from None
    if not matched:
        raise UsageError(f"--images {images}: matches no file")
    return images


def _prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to mix two runs' files: results already there need --overwrite, which removes them."""
    if not fileio.exists(out):
        return
    ours = [f for f in fileio.list_files(out)
            if os.path.basename(f).startswith((CAPTIONS + "-", SUMMARY_FILE, COCO_RESULTS_FILE))
            or f[len(out.rstrip("/")) + 1:].startswith(os.path.dirname(REJECTED) + "/")]
    if ours and not overwrite:
        raise UsageError(f"--output {out} already holds results ({os.path.basename(ours[0])}, ...); "
                         "pass --overwrite to replace them")
    for f in ours:
        fileio.remove(f)


def prepare(args) -> dict:
    """The launcher's work before the pipeline: check the inputs and the export, clear --output."""
    try:
        info = client.export_info(args.model)
    except client.ModelError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    opts = {"images_list": None, "pattern": None, "list_dir": None}
    if args.images_list:
        if not fileio.exists(args.images_list):
            raise UsageError(f"--images-list {args.images_list}: no such file")
        listed = args.images_list if fileio.is_gcs(args.images_list) else os.path.abspath(args.images_list)
        opts.update(images_list=listed, list_dir=listed.rsplit("/", 1)[0])
    else:
        opts["pattern"] = _input_pattern(args.images)
    model = args.model if fileio.is_gcs(args.model) else os.path.abspath(args.model)
    out = args.output if fileio.is_gcs(args.output) else os.path.abspath(args.output)
    _prepare_output(out, args.overwrite)
    max_length = args.max_length or savedmodel.export_max_length(info)
    static = {"command": " ".join(["python -m pipelines.caption_images"] + list(args.argv)),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": model, "beam_size": args.beam_size, "max_length": max_length, "decoding": args.controls,
              "encoder_precision": args.encoder_precision, "images": opts["pattern"] or opts["images_list"]}
    return dict(opts, model=model, output=out, beam_size=args.beam_size, max_length=max_length, controls=args.controls,
                batch_size=args.batch_size, model_copies=args.model_copies or None, num_shards=args.num_shards,
                coco_results=args.coco_results, encoder_precision=args.encoder_precision, static=static)


def run(argv=None) -> dict:
    """Parse flags, run the pipeline to the end, return summary.json's content (or, with
    `--dry_run=True` on a remote runner, {"dry_run": True, "runner", "pipeline"})."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = parse_args(argv)
    args.argv = argv
    options = PipelineOptions(beam_args)
    runner = launcher.runner_of(options)
    launcher.check_remote_paths(runner, {"--images": args.images, "--images-list": args.images_list,
                                         "--model": args.model, "--output": args.output})
    launcher.validate_options(options, runner)
    opts = prepare(args)
    dry = launcher.run_pipeline(options, lambda p: build(p, opts))
    if dry:
        return dry
    summary_path = fileio.join(opts["output"], SUMMARY_FILE)
    if not fileio.exists(summary_path):  # WriteSummary writes it or fails the run
        raise CountsError(f"the run ended without {summary_path}")
    return fileio.read_json(summary_path)


def summary_line(s: dict, seconds: float) -> str:
    where = s.get("caption_files") or []
    return (f"captioned {s['captioned']} of {s['inputs']} images, rejected {s['rejected']} (see rejected/); "
            f"captions in {len(where)} file(s) {CAPTIONS}-*{SUFFIX}; {seconds:.0f}s")


@cli.command
def main(argv=None) -> int:
    launcher.quiet_beam_logging()
    t = time.time()
    try:
        s = run(argv)
    except CountsError as e:
        raise CountsError(launcher.without_step(e)) from None
    except fileio.WriteError as e:
        raise fileio.WriteError(launcher.without_step(e), e.path, e.errno) from None
    if s.get("dry_run"):
        print(launcher.DRY_RUN_LINE.format(runner=s["runner"]))
        return 0
    print(summary_line(s, time.time() - t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
