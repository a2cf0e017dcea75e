"""Resumable download of one file over HTTP(S), with the standard library only.

    size = fetch.fetch(url, dest)   # dest appears only once every announced byte has arrived

The file streams to `dest + '.part'` in 1 MiB chunks. A `.part` left by an interrupted run is
continued with an HTTP Range request; a server that ignores Range (answers 200) restarts it from
zero, and one that answers another range than asked is not stitched on. Only when the byte count
equals the server's size (Content-Length, or the total of Content-Range on resume) is it renamed
to `dest`. A connection that drops mid-body is resumed a few times before giving up, keeping the
`.part` for the next run. Every failure is a FetchError of one line naming the URL.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request

from tqdm import tqdm

from caption_io import cli

DEFAULT_TIMEOUT = 60.0  # seconds for connecting and for each read, not for the whole file
CHUNK = 1 << 20  # bytes per read/write; the zips never sit in memory
RETRIES = 3  # reconnects (with Range) after a connection drops mid-body
RETRY_WAIT_S = 2.0  # times the attempt number
USER_AGENT = "show-attend-tell-downloader/0.1 (+urllib)"

log = logging.getLogger(__name__)


class FetchError(cli.UserError):
    """A failure to report to the user in one line (the message names the URL or file).
    Exit 1: the flags were fine, the server, the network or the disk was not."""

    exit_code = 1


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived (worth a retry)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _reason(err: BaseException) -> str:
    """'Connection refused' rather than '<urlopen error [Errno 111] Connection refused>'."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        if not isinstance(err.reason, BaseException):
            return _one_line(err.reason)
        err = err.reason
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return _one_line(err) or type(err).__name__


def progress(total: int | None, initial: int, desc: str) -> tqdm:
    """A byte-count progress bar, drawn only for a person at a terminal."""
    # A bar is noise in logs and CI output: only draw it for a person at a terminal.
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not sys.stderr.isatty(), leave=False)


def check_free_space(folder: str, needed: int, what: str) -> None:
    """FetchError unless folder's disk has needed bytes free (what: the work, for the message)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FetchError(f"not enough disk space in {folder} to {what}: "
                            f"need {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch_once(url: str, part: str, timeout: float) -> int | None:
    """One HTTP exchange that appends to (or restarts) `part`. Returns the total size the
    server announced (None if it did not say). Raises _Incomplete on a short body."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the .part is already complete (an earlier run stopped
        # before renaming it) or is longer than the file and cannot be a prefix of it.
        _, total = _parse_content_range(e.headers.get("Content-Range"))
        e.close()
        if total == offset:
            return total
        log.info("%s: %d-byte .part does not fit the %s-byte file; starting again",
                 url, offset, total)
        os.remove(part)
        return _fetch_once(url, part, timeout)

    with resp:
        plan = _continue_or_restart(resp, url, part, offset)
        if plan is None:  # the answer cannot be stitched on: the .part is gone, ask again
            return _fetch_once(url, part, timeout)
        offset, total, mode = plan
        if total is not None:
            check_free_space(os.path.dirname(part) or ".", total - offset, f"download {url}")
        written = _write_body(resp, part, mode, offset, total, url)
    if total is not None and written < total:
        raise _Incomplete(f"connection closed after byte {written} of {total}")
    if total is not None and written > total:  # cannot come from http.client, but be sure
        os.remove(part)
        raise FetchError(f"{url}: received {written} bytes, server announced {total}; "
                         f"deleted {part}, rerun to download again")
    return total


def _continue_or_restart(resp, url: str, part: str, offset: int) -> tuple[int, int | None, str] | None:
    """How the answer to a request for bytes offset.. is written: (offset, total size or None,
    file mode), from 0 where the server sent the whole file; None (the .part deleted) where it
    sent another range than the one asked for."""
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if offset and resp.status == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range"))
        if start != offset:  # not the range we asked for: do not stitch it on
            log.info("%s: server answered Range %s with %r; starting again", url,
                     offset, resp.headers.get("Content-Range"))
            resp.close()
            os.remove(part)
            return None
        log.info("resuming %s at byte %d of %s", url, offset, total)
        return offset, total, "ab"
    if offset:
        log.info("%s: server ignored the Range request (HTTP %d); starting again from "
                 "byte 0", url, resp.status)
    log.info("downloading %s (%s bytes)", url, length if length is not None else "unknown")
    return 0, length, "wb"


def _write_body(resp, part: str, mode: str, offset: int, total: int | None, url: str) -> int:
    """Stream the body onto part, synced to disk before returning. -> the part's size."""
    written = offset
    with open(part, mode) as f, progress(total, offset, os.path.basename(url)) as bar:
        while True:
            chunk = resp.read(CHUNK)
            if not chunk:
                break
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())  # the rename that follows must not outrun the data
    return written


def fetch(url: str, dest: str, timeout: float = DEFAULT_TIMEOUT, retries: int = RETRIES) -> int:
    """Download `url` to `dest` through `dest + '.part'`, resuming a .part left behind.

    `dest` appears only once the byte count matches the size the server announced. A
    connection that drops mid-file is resumed up to `retries` times; after that the .part
    is kept so the next call resumes it. Returns the size of `dest` in bytes. Raises
    FetchError with a one-line message naming the URL.
    """
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    attempt = 0
    while True:
        try:
            total = _fetch_once(url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            raise FetchError(f"{url}: HTTP {e.code} {_one_line(e.reason)}") from None
        except urllib.error.URLError as e:  # DNS, refused, unreachable: nothing to resume
            raise FetchError(f"cannot reach {url}: {_reason(e)}") from None
        except (_Incomplete, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if attempt >= retries:
                what = (f"timed out after {timeout:g} s" if isinstance(e, TimeoutError)
                        else _reason(e))
                keep = f"; kept {have} bytes in {part}, rerun to resume" if have else ""
                raise FetchError(f"{url}: download incomplete: {what}{keep}") from None
            attempt += 1
            log.info("%s: %s; reconnecting to resume at byte %d (retry %d of %d)",
                     url, _reason(e), have, attempt, retries)
            time.sleep(RETRY_WAIT_S * attempt)
    size = os.path.getsize(part)
    if total is None:
        log.warning("%s: server sent no size; relying on the zip check alone", url)
    os.replace(part, dest)
    return size
