"""Check a data directory against what the pipeline recorded it should hold.

    python -m pipelines.validate DATA_DIR [--full]

Without --full: every shard metadata.json lists is there, with the byte size it
was written at (cheap, local or gs://; the trainer runs the same check before
its first step). With --full, every byte is read as well: each shard's sha256,
every record parses, token ids are in the vocabulary, features are finite, and
the records and captions per shard and per split equal metadata.json's counts.

Prints one line per split and one per problem; exit 0 when the directory is
whole, 1 when something is wrong, 2 when DATA_DIR is not a data directory.
"""
from __future__ import annotations

import logging
import sys

from caption_io import cli, fileio, records

RERUN = "re-run `python -m pipelines.preprocess` for it (or copy the data directory again)"


class NotADataDir(ValueError):
    """DATA_DIR has no readable metadata.json."""


def read_metadata(data_dir: str) -> dict:
    path = fileio.join(data_dir, records.METADATA_FILE)
    if not fileio.exists(path):
        raise NotADataDir(f"{data_dir}: no {records.METADATA_FILE} (not a data directory, or its "
                          "preprocess run did not finish)")
    try:
        return fileio.read_json(path)
    except ValueError as e:
        raise NotADataDir(f"{path}: not valid JSON ({e})") from None


def listed_shards(data_dir: str, meta: dict, split: str) -> list[dict] | None:
    """[{path, name, records, bytes, sha256}] of a split as metadata.json lists
    them; None for a data directory written before shards were listed."""
    files = meta["splits"][split].get("files")
    if files is None:
        return None
    return [dict(f, path=fileio.join(data_dir, f["name"])) for f in files]


def check_sizes(data_dir: str, meta: dict, split: str) -> list[str]:
    """One line per listed shard that is missing or not the size it was written at."""
    problems = []
    for f in listed_shards(data_dir, meta, split) or []:
        got = fileio.size(f["path"])
        if got is None:
            problems.append(f"{f['path']}: missing (metadata.json lists it with {f['records']} records); {RERUN}")
        elif got != f["bytes"]:
            why = "cut short (an interrupted copy or a full disk?)" if got < f["bytes"] else "larger than written"
            problems.append(f"{f['path']}: {got:,} bytes where metadata.json says {f['bytes']:,}: {why}; {RERUN}")
    return problems


def check_contents(data_dir: str, meta: dict, split: str, vocab_size: int) -> tuple[list[str], dict]:
    """Read every record of a split's shards. -> (problems, {records, captions})."""
    import numpy as np
    import tensorflow as tf

    problems, totals = [], {"records": 0, "captions": 0}
    shape = tuple(meta["features"]["shape"])
    for f in listed_shards(data_dir, meta, split) or []:
        if fileio.size(f["path"]) is None:
            continue  # check_sizes reports it
        if fileio.sha256(f["path"]) != f["sha256"]:
            problems.append(f"{f['path']}: its sha256 differs from the one written; {RERUN}")
        n = captions = 0
        try:
            for batch in tf.data.TFRecordDataset([f["path"]]).batch(64):
                p = records.parse_examples(batch, shape)
                ids = p["captions"].flat_values.numpy()
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    problems.append(f"{f['path']}: token id {int(ids.max())} outside the vocabulary of {vocab_size}")
                bad = ~np.isfinite(p["features"].numpy()).all(axis=(1, 2))
                if bad.any():
                    first = int(p["image_id"].numpy()[bad][0])
                    problems.append(f"{f['path']}: {int(bad.sum())} records with non-finite features (image {first})")
                n += int(batch.shape[0])
                captions += int(p["captions"].row_lengths().numpy().sum())
        except (tf.errors.OpError, ValueError) as e:
            msg = str(e).strip().splitlines()[0][:200]
            problems.append(f"{f['path']}: unreadable after {n} records ({msg}); {RERUN}")
            continue
        if n != f["records"]:
            problems.append(f"{f['path']}: {n} records where metadata.json says {f['records']}; {RERUN}")
        totals["records"] += n
        totals["captions"] += captions
    info = meta["splits"][split]
    for what, key in (("images", "records"), ("captions", "captions")):
        if not problems and totals[key] != info[what]["written"]:
            problems.append(f"{split}: {totals[key]} {what} in the shards where metadata.json says "
                            f"{info[what]['written']}")
    return problems, totals


def validate(data_dir: str, full: bool = False) -> tuple[list[str], list[str]]:
    """-> (summary lines, problem lines) for a data directory."""
    from caption_io import vocab as vocab_lib

    meta = read_metadata(data_dir)
    lines, problems = [], []
    vocab_size = None
    if full:
        try:
            vocab_size = len(vocab_lib.read(fileio.join(data_dir, meta["vocab"]["file"])))
        except (OSError, vocab_lib.VocabError) as e:
            problems.append(f"{data_dir}: vocabulary unreadable ({e})")
    for split, info in meta["splits"].items():
        listed = listed_shards(data_dir, meta, split)
        if listed is None:
            lines.append(f"{split}: metadata.json lists no shard sizes (written by an older pipeline): not checked")
            continue
        found = check_sizes(data_dir, meta, split)
        if full and vocab_size is not None:
            more, totals = check_contents(data_dir, meta, split, vocab_size)
            found += more
            counted = f"; read {totals['records']:,} records, {totals['captions']:,} captions"
        else:
            counted = ""
        state = "ok" if not found else f"{len(found)} problem(s)"
        lines.append(f"{split}: {len(listed)} shards, {sum(f['records'] for f in listed):,} records, "
                     f"{sum(f['bytes'] for f in listed) / 1e6:,.1f} MB{counted}: {state}")
        problems += found
    return lines, problems


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m pipelines.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", metavar="DATA_DIR", help="a data directory from pipelines.preprocess (local or gs://)")
    ap.add_argument("--full", action="store_true", help="read every byte: checksums, records, ids, features, counts")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        lines, problems = validate(args.data_dir.rstrip("/"), args.full)
    except NotADataDir as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{args.data_dir}: {'whole' if not problems else f'{len(problems)} problem(s)'}"
          f"{' (every byte read)' if args.full else ' (sizes; --full reads every byte)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
