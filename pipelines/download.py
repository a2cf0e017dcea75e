"""Download, verify and extract MS-COCO (images and caption annotations).

    python -m pipelines.download --output DIR [--year 2014|2017] [--splits train,val]
                                 [--base-url URL] [--no-images] [--delete-zips]

Leaves the standard layout that `pipelines` reads:

    DIR/annotations/captions_train2014.json, captions_val2014.json, ...
    DIR/train2014/COCO_train2014_000000000009.jpg, ...
    DIR/val2014/...
    DIR/.downloads/train2014.zip, train2014.done, ...   (bookkeeping)

Each zip goes through three steps, and each step can be repeated safely:

1. Fetch (pipelines/fetch.py): stream to `DIR/.downloads/NAME.zip.part`, continuing a `.part`
   left by an interrupted run with an HTTP Range request; renamed to `NAME.zip` only when every
   byte the server announced has arrived.
2. Verify and extract in one pass. Opening the zip reads its central directory (a truncated
   or wrong file fails here); every member name is checked before anything is written (no
   absolute paths, no `..`, no symlinks), then each member is streamed to disk, and zipfile
   checks its CRC-32 at the end of each member (and that its local header matches the
   directory). A separate `testzip()` pass would read the 13 GB train zip a second time
   for no more assurance: extraction has to read every byte anyway. Any failure deletes
   the zip (and the half-written member) and says so; a rerun downloads it again.
3. Mark: `DIR/.downloads/NAME.done` records the verified size and what was extracted. With
   it in place (and the extracted folders present) a rerun touches neither the network nor
   the disk for that zip.

Only the standard library (urllib) and tqdm, so it runs anywhere Python does. DIR must be a
local path: 19 GB of zips should not stream through a gs:// client; download to a local
disk, then copy the extracted folders with `gsutil -m cp -r` if the pipeline reads gs://.
"""
from __future__ import annotations

if __name__ == "__main__":  # the quiet start, as every command has it (see caption_io/quiet.py)
    from caption_io import quiet

    quiet.install()

import argparse
import json
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib

from caption_io import cli
from pipelines import fetch as fetch_lib

DEFAULT_BASE_URL = "http://images.cocodataset.org/"
YEARS = (2014, 2017)
SPLITS = ("train", "val")

log = logging.getLogger(__name__)
# The download's one error: a fetch's failure, or a zip's, in one line (exit 1).
DownloadError = fetch_lib.FetchError


# --- verification and extraction -------------------------------------------------------

class UnsafeMember(Exception):
    pass


_BAD_ZIP = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, UnsafeMember)


def _member_path(root: str, info: zipfile.ZipInfo) -> str:
    """Where `info` goes under `root`, or UnsafeMember if it would go anywhere else.

    The check is on the name itself, not on resolved paths, so a DIR/train2014 that is a
    symlink to a bigger disk (a common setup) stays allowed.
    """
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
            or "\0" in name):
        raise UnsafeMember(f"member {name!r} would be written outside the output folder")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise UnsafeMember(f"member {name!r} is a symbolic link")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise UnsafeMember(f"member {name!r} has no file name")
    return os.path.join(root, *parts)


def _extract(zip_path: str, root: str, required: list[str]) -> tuple[list[str], int]:
    """Verify `zip_path` while extracting it under `root` (see the module docstring).
    Returns (top-level names extracted, number of members). Any of _BAD_ZIP means the zip is
    bad: zipfile raises BadZipFile for a wrong CRC or a broken directory, zlib.error for
    corrupt deflate data, EOFError or ValueError for members that run past the file."""
    with zipfile.ZipFile(zip_path) as zf:  # reads the central directory
        infos = zf.infolist()
        targets = [_member_path(root, info) for info in infos]  # all checked before writing
        names = [info.filename.rstrip("/") for info in infos]
        missing = [r for r in required
                   if not any(n == r or n.startswith(r + "/") for n in names)]
        if missing:
            raise zipfile.BadZipFile(f"it does not contain {', '.join(missing)}")
        unpacked = sum(info.file_size for info in infos)
        # Files left by an interrupted extraction get overwritten, not added to.
        overwritten = sum(os.path.getsize(t) for t in targets if os.path.isfile(t))
        fetch_lib.check_free_space(root, unpacked - overwritten, f"extract {zip_path}")

        tops: list[str] = []
        with fetch_lib.progress(unpacked, 0, f"extract {os.path.basename(zip_path)}") as bar:
            for info, target in zip(infos, targets):
                top = os.path.relpath(target, root).split(os.sep)[0]
                if top not in tops:
                    tops.append(top)
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Written aside and renamed, so a member that fails its CRC never sits in
                # the standard layout looking like a good image.
                tmp = target + ".extracting"
                try:
                    with zf.open(info) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, fetch_lib.CHUNK)  # reads to EOF: CRC-32 checked
                    os.replace(tmp, target)
                except BaseException:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    raise
                bar.update(info.file_size)
    return tops, len(infos)


def _read_marker(path: str) -> dict | None:
    try:
        with open(path) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def _write_marker(path: str, marker: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, path)


def _ensure(url: str, output_dir: str, required: list[str], timeout: float,
            delete_zip: bool) -> list[str]:
    """Fetch, verify and extract one zip unless its marker says that is done."""
    downloads = os.path.join(output_dir, ".downloads")
    zip_name = url.rsplit("/", 1)[-1]
    zip_path = os.path.join(downloads, zip_name)
    marker_path = os.path.join(downloads, zip_name[: -len(".zip")] + ".done")

    marker = _read_marker(marker_path)
    if marker and marker.get("extracted"):
        present = all(os.path.exists(os.path.join(output_dir, t)) for t in marker["extracted"])
        zip_ok = not os.path.exists(zip_path) or os.path.getsize(zip_path) == marker.get("size")
        if present and zip_ok:
            log.info("%s: already downloaded, verified and extracted", zip_name)
            return [os.path.join(output_dir, t) for t in marker["extracted"]]
        log.info("%s: marker found but the extracted files or the zip changed; redoing it",
                 zip_name)
    if os.path.exists(marker_path):
        os.remove(marker_path)

    if os.path.exists(zip_path):
        # Only fetch.fetch() creates it, after the size check; so only the zip check is left.
        log.info("%s: found the downloaded zip; verifying and extracting", zip_name)
    else:
        fetch_lib.fetch(url, zip_path, timeout=timeout)
    size = os.path.getsize(zip_path)
    log.info("verifying and extracting %s into %s", zip_name, output_dir)
    try:
        tops, members = _extract(zip_path, output_dir, required)
    except _BAD_ZIP as e:
        os.remove(zip_path)
        raise DownloadError(f"{zip_path} (from {url}) failed verification: {cli.one_line(e)}; "
                            f"deleted it, rerun to download it again") from None
    _write_marker(marker_path, {"url": url, "size": size, "members": members,
                                "extracted": tops, "verified": "size + central directory + "
                                "member names + CRC-32 of every member"})
    log.info("%s: %d bytes verified, %d members extracted", zip_name, size, members)
    if delete_zip:
        os.remove(zip_path)
    return [os.path.join(output_dir, t) for t in tops]


def _check_local(output_dir: str) -> None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", str(output_dir)):
        raise ValueError(f"must be a local path, not {output_dir} (download locally, then "
                         f"copy with gsutil if the pipeline reads from Cloud Storage)")


def _check_base_url(base_url: str) -> str:
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"must be an http:// or https:// URL, not {base_url!r}")
    return base_url.rstrip("/") + "/"


def download(output_dir: str, year: int = 2014, splits=SPLITS, base_url: str = DEFAULT_BASE_URL,
             images: bool = True, timeout: float = fetch_lib.DEFAULT_TIMEOUT,
             delete_zips: bool = False) -> list[str]:
    """Download, verify and extract COCO `year` into local `output_dir`.

    Fetches annotations/annotations_trainval{year}.zip and, when `images`, zips/{split}{year}.zip
    for each split. Returns the extracted top-level paths (e.g. DIR/annotations,
    DIR/train2014), verified now or by an earlier run. Raises DownloadError (one-line
    message) on network or verification failure, ValueError on bad arguments.
    """
    _check_local(output_dir)
    base_url = _check_base_url(base_url)
    if int(year) not in YEARS:
        raise ValueError(f"year must be one of {', '.join(map(str, YEARS))}, not {year}")
    splits = splits.split(",") if isinstance(splits, str) else list(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be some of {', '.join(SPLITS)}, not {splits}")
    os.makedirs(output_dir, exist_ok=True)

    paths = _ensure(f"{base_url}annotations/annotations_trainval{year}.zip", output_dir,
                    [f"annotations/captions_{s}{year}.json" for s in splits], timeout, delete_zips)
    if images:
        for split in splits:
            paths += _ensure(f"{base_url}zips/{split}{year}.zip", output_dir,
                             [f"{split}{year}"], timeout, delete_zips)
    return list(dict.fromkeys(paths))


# --- command line ------------------------------------------------------------------------

def _arg(check):
    def parse(value: str) -> str:
        try:
            return check(value) or value
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _parse_splits(value: str) -> list[str]:
    splits = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise argparse.ArgumentTypeError(
            f"unknown split {', '.join(map(repr, bad)) or repr(value)} (choose from {', '.join(SPLITS)})")
    return splits


@cli.command(interrupted="interrupted; rerun the same command to resume")
def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m pipelines.download",
        description="Download, verify and extract MS-COCO images and caption annotations "
                    "into DIR (DIR/annotations/captions_train2014.json, DIR/train2014/*.jpg, ...). "
                    "Resumable and idempotent: rerun after an interruption. Bookkeeping lives in "
                    "DIR/.downloads.",
        epilog="DIR must be a local path (gs:// and other remote paths are not supported): "
               "download to a local disk, then copy the folders with `gsutil -m cp -r`. "
               "About 19 GB of zips for 2014 train+val, and as much again extracted.")
    parser.add_argument("--output", required=True, metavar="DIR", type=_arg(_check_local),
                        help="local folder to download and extract into (not gs://)")
    parser.add_argument("--year", type=int, choices=YEARS, default=2014)
    parser.add_argument("--splits", type=_parse_splits, default=list(SPLITS),
                        help="comma-separated, from: %s (default: all)" % ",".join(SPLITS))
    parser.add_argument("--base-url", type=_arg(_check_base_url), default=DEFAULT_BASE_URL,
                        help="server holding annotations/ and zips/ (default: %(default)s)")
    parser.add_argument("--no-images", dest="images", action="store_false",
                        help="only the caption annotations")
    parser.add_argument("--delete-zips", action="store_true",
                        help="delete each zip once it is verified and extracted")
    parser.add_argument("--timeout", type=float, default=fetch_lib.DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="connect/read timeout (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"argument --timeout: must be positive, not {args.timeout:g}")

    # What it fetches, resumes and skips goes to stdout with the paths: stderr is kept for the
    # one error line (and the progress bar, on a terminal). Same format as every command's log.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(cli.VERBOSE_LOG_FORMAT if cli.is_verbose() else cli.LOG_FORMAT))
    loggers = (log, fetch_lib.log)
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False  # not a second time on stderr through the root logger
    try:
        return _run(args)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True


def _run(args: argparse.Namespace) -> int:
    try:
        paths = download(args.output, year=args.year, splits=args.splits, base_url=args.base_url,
                         images=args.images, timeout=args.timeout, delete_zips=args.delete_zips)
    except OSError as e:  # disk full, permission denied, ...: one line, exit 1 (DownloadError's)
        raise DownloadError(cli.one_line(e)) from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
