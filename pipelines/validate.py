"""Check a data directory against what the pipeline recorded it should hold.

    python -m pipelines.validate DATA_DIR [--full]

Without --full: every shard metadata.json lists is there, with the byte size it
was written at (cheap, local or gs://; caption_io.metadata.check_sizes, which the
trainer runs before its first step too). With --full, every byte is read as well: each shard's sha256,
every record parses, token ids are in the vocabulary, features are finite, and
the records and captions per shard and per split equal metadata.json's counts.

Prints one line per split and one per problem; exit 0 when the directory is
whole, 1 when something is wrong, 2 when DATA_DIR is not a data directory.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start goes in before anything imports TensorFlow
    from caption_io import quiet

    quiet.install()

import sys

from caption_io import cli, fileio, metadata, records


class NotADataDir(metadata.MetadataError):
    """DATA_DIR has no readable metadata.json, or one of another format (exit 2)."""


def check_contents(data_dir: str, meta: metadata.Metadata, split: str, vocab_size: int) -> tuple[list[str], dict]:
    """Read every record of a split's shards. -> (problems, {records, captions})."""
    import numpy as np
    import tensorflow as tf

    problems, totals = [], {"records": 0, "captions": 0}
    shape = meta.features.shape
    for f in meta.splits[split].files or ():
        path = f.path(data_dir)
        if fileio.size(path) is None:
            continue  # check_sizes reports it
        if fileio.sha256(path) != f.sha256:
            problems.append(f"{path}: its sha256 differs from the one written; {metadata.RERUN}")
        n = captions = 0
        try:
            for batch in tf.data.TFRecordDataset([path]).batch(64):
                p = records.parse_examples(batch, shape)
                ids = p["captions"].flat_values.numpy()
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    problems.append(f"{path}: token id {int(ids.max())} outside the vocabulary of {vocab_size}")
                bad = ~np.isfinite(p["features"].numpy()).all(axis=(1, 2))
                if bad.any():
                    first = int(p["image_id"].numpy()[bad][0])
                    problems.append(f"{path}: {int(bad.sum())} records with non-finite features (image {first})")
                n += int(batch.shape[0])
                captions += int(p["captions"].row_lengths().numpy().sum())
        except (tf.errors.OpError, ValueError) as e:
            msg = str(e).strip().splitlines()[0][:200]
            problems.append(f"{path}: unreadable after {n} records ({msg}); {metadata.RERUN}")
            continue
        if n != f.records:
            problems.append(f"{path}: {n} records where metadata.json says {f.records}; {metadata.RERUN}")
        totals["records"] += n
        totals["captions"] += captions
    info = meta.splits[split]
    for what, key, written in (("images", "records", info.images.written),
                               ("captions", "captions", info.captions.written)):
        if not problems and totals[key] != written:
            problems.append(f"{split}: {totals[key]} {what} in the shards where metadata.json says {written}")
    return problems, totals


def validate(data_dir: str, full: bool = False) -> tuple[list[str], list[str]]:
    """-> (summary lines, problem lines) for a data directory."""
    from caption_io import vocab as vocab_lib

    try:
        meta = metadata.read(data_dir)
    except metadata.MetadataError as e:
        raise NotADataDir(str(e)) from None
    lines, problems = [], []
    vocab_size = None
    if full:
        try:
            vocab_size = len(vocab_lib.read(fileio.join(data_dir, meta.vocab.file)))
        except (OSError, vocab_lib.VocabError) as e:
            problems.append(f"{data_dir}: vocabulary unreadable ({e})")
    for split, info in meta.splits.items():
        listed = info.files
        if listed is None:
            lines.append(f"{split}: metadata.json lists no shard sizes (written by an older pipeline): not checked")
            continue
        found = metadata.check_sizes(data_dir, meta, split)
        if full and vocab_size is not None:
            more, totals = check_contents(data_dir, meta, split, vocab_size)
            found += more
            counted = f"; read {totals['records']:,} records, {totals['captions']:,} captions"
        else:
            counted = ""
        state = "ok" if not found else f"{len(found)} problem(s)"
        lines.append(f"{split}: {len(listed)} shards, {sum(f.records for f in listed):,} records, "
                     f"{sum(f.bytes for f in listed) / 1e6:,.1f} MB{counted}: {state}")
        problems += found
    return lines, problems


@cli.command
def main(argv=None) -> int:
    """0 whole, 1 damaged (each problem an error line), 2 not a data directory (NotADataDir)."""
    ap = cli.Parser(prog="python -m pipelines.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", metavar="DATA_DIR", help="a data directory from pipelines.preprocess (local or gs://)")
    ap.add_argument("--full", action="store_true", help="read every byte: checksums, records, ids, features, counts")
    args = ap.parse_args(argv)
    lines, problems = validate(args.data_dir.rstrip("/"), args.full)
    for line in lines:
        print(line)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{args.data_dir}: {'whole' if not problems else f'{len(problems)} problem(s)'}"
          f"{' (every byte read)' if args.full else ' (sizes; --full reads every byte)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
