"""Reading and writing the small files of a data or job directory, local or gs://.

metadata.json, vocab.txt, feature statistics, encoder weights and rejected
records all go through here, so there is one place that knows how to talk to
Cloud Storage. Large files (TFRecord shards, images) are streamed by Beam and
tf.data, which have their own gs:// support.

gs:// goes through the google-cloud-storage client, which honours
STORAGE_EMULATOR_HOST: tests point it at an emulator on loopback.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile

from caption_io import cli

TMP_MARK = ".tmp-"  # write_bytes's file before its rename: a killed process may leave one


class WriteError(OSError, cli.UserError):
    """A write that failed for want of space or rights; str() is one line naming the path.
    Made from that one line (Beam re-raises a DoFn's error as its type, made from its first
    argument and the step's name), with .path and .errno when known."""

    def __init__(self, message: str, path: str | None = None, code: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, code


# The errnos of a write the machine refused: full disk, quota, file-size limit, read-only, rights.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for this file system or limit", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
# TensorFlow's C++ file writers report the same as errors of their own, "PATH; Reason [Op:Name]".
_TF_WRITE_REASONS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                     "File too large": errno.EFBIG, "Read-only file system": errno.EROFS,
                     "Permission denied": errno.EACCES}


def write_error(e: BaseException, path: str | None = None) -> WriteError | None:
    """`e` as a WriteError naming `path` (default: the file the error names) when it is a
    refused write: an OSError, or TensorFlow's error for one (checkpoints, summaries, exports).
    None for anything else, which the caller lets through."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        code, where = e.errno, e.filename
    elif type(e).__module__.startswith("tensorflow") and hasattr(e, "message"):
        found = next(((r, c) for r, c in _TF_WRITE_REASONS.items() if r in e.message), None)
        if not found:
            return None
        code = found[1]
        m = re.search(r"(\S+); " + re.escape(found[0]), e.message)
        where = m.group(1) if m else None
    else:
        return None
    where = path or (str(where) if where else "a file")
    # A temporary name (ours, or TF's before its rename) says less than the file it was for.
    where = re.sub(r"(" + re.escape(TMP_MARK) + r"\d+|\.tempstate\d+)$", "", where)
    return WriteError(f"cannot write {where}: {_WRITE_ERRNOS[code]}", where, code)


@contextlib.contextmanager
def writing(path: str | None):
    """Within the block, a refused write (full disk...) becomes one WriteError naming `path`
    (None: the file the error names)."""
    try:
        yield
    except Exception as e:
        err = write_error(e, path)
        if err is None:
            raise
        raise err from None


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        bucket, blob = split_gcs(base.rstrip("/"))
        # normpath: a recorded relative path ("../data") resolves inside the bucket too.
        return f"gs://{bucket}" + posixpath.normpath(posixpath.join("/" + blob, *[p.strip("/") for p in parts]))
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """`path` resolved now, so that a file recording it means the same from anywhere."""
    return path if is_gcs(path) else os.path.abspath(path)


def relative(path: str, start: str) -> str | None:
    """`path` relative to the folder `start` when both are on one file system (local, or
    one bucket), so that the two copied together keep their link; else None."""
    if is_gcs(path) != is_gcs(start):
        return None
    if is_gcs(path):
        (b1, p1), (b2, p2) = split_gcs(path), split_gcs(start)
        return posixpath.relpath("/" + p1, "/" + p2) if b1 == b2 else None
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start))


def split_gcs(path: str) -> tuple[str, str]:
    bucket, _, blob = path[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"{path}: a gs:// path needs a bucket name")
    return bucket, blob


_CLIENT = None


def _bucket(name: str):
    global _CLIENT
    if _CLIENT is None:
        from google.cloud import storage  # heavy import, only when gs:// is used

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            _CLIENT = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            _CLIENT = storage.Client()
    return _CLIENT.bucket(name)


def _blob(path: str):
    bucket, blob = split_gcs(path)
    return _bucket(bucket).blob(blob)


@contextlib.contextmanager
def _gcs_errors(path: str):
    """Cloud Storage's errors as the OSErrors a local file gives, so that callers
    handle both the same way: a missing object is a FileNotFoundError."""
    from google.api_core import exceptions as gexc

    try:
        yield
    except gexc.NotFound:
        raise FileNotFoundError(errno.ENOENT, "no such object", path) from None
    except gexc.Forbidden as e:
        raise PermissionError(errno.EACCES, f"access denied ({e.message})", path) from None
    except gexc.GoogleAPIError as e:
        raise OSError(errno.EIO, f"Cloud Storage error ({getattr(e, 'message', None) or e})", path) from None


def exists(path: str) -> bool:
    if is_gcs(path):
        bucket, prefix = split_gcs(path)
        with _gcs_errors(path):
            if _blob(path).exists():
                return True
            # A "directory" exists when some object lives under it.
            return any(True for _ in _bucket(bucket).list_blobs(prefix=prefix.rstrip("/") + "/", max_results=1))
    return os.path.exists(path)


def size(path: str) -> int | None:
    """A file's size in bytes, or None when there is no such file."""
    if is_gcs(path):
        bucket, name = split_gcs(path)
        with _gcs_errors(path):
            blob = _bucket(bucket).get_blob(name)
        return None if blob is None else int(blob.size)
    return os.path.getsize(path) if os.path.isfile(path) else None


def sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in pieces (shards run to hundreds of MB)."""
    h = hashlib.sha256()
    with open_read(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def makedirs(path: str) -> None:
    if not is_gcs(path):  # GCS has no directories
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        with _gcs_errors(path):
            return _blob(path).download_as_bytes()
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def open_read(path: str):
    """A binary file object to stream `path` from (large inputs: read what you need)."""
    if not is_gcs(path):
        with open(path, "rb") as f:
            yield f
        return
    # Errors come at the first read, inside the caller's block: translate those too.
    with _gcs_errors(path), _blob(path).open("rb") as reader:
        yield reader


def write_bytes(path: str, data: bytes) -> None:
    if is_gcs(path):
        with _gcs_errors(path):
            _blob(path).upload_from_string(data)
        return

    def fill(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _write_local(path, fill)


def _write_local(path: str, fill) -> None:
    """fill(tmp) makes the file beside `path`, then it is renamed onto it: a reader never sees
    half a file, and a write refused part-way (a full disk) leaves neither half a file nor
    the temporary one."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with writing(path):
            makedirs(os.path.dirname(path) or ".")
            fill(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str):
    return json.loads(read_text(path))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def list_files(prefix_dir: str, suffix: str = "") -> list[str]:
    """Files directly or indirectly under a directory, sorted."""
    if is_gcs(prefix_dir):
        bucket, prefix = split_gcs(prefix_dir)
        prefix = prefix.rstrip("/") + "/"
        with _gcs_errors(prefix_dir):
            names = [b.name for b in _bucket(bucket).list_blobs(prefix=prefix)]
        return sorted(f"gs://{bucket}/{n}" for n in names if n.endswith(suffix))
    out = []
    for root, _, files in os.walk(prefix_dir):
        out.extend(os.path.join(root, f) for f in files if f.endswith(suffix))
    return sorted(out)


def upload(local_path: str, dest: str) -> None:
    """Copy a local file to `dest` (local or gs://), appearing there whole or not at all."""
    if is_gcs(dest):
        with writing(dest), _gcs_errors(dest):
            _blob(dest).upload_from_filename(local_path)
        return
    _write_local(dest, lambda tmp: shutil.copyfile(local_path, tmp))


def write_through_local(dest: str, write) -> None:
    """write(local_path) makes a file in a fresh temporary folder (libraries such as h5py
    want a local path, and crash outright on a full disk); it is then put at `dest` whole."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(dest))
        with writing(local):
            write(local)
        upload(local, dest)


def local_copy(path: str) -> str:
    """A local file with the contents of `path` (itself when already local)."""
    if not is_gcs(path):
        return path
    fd, tmp = tempfile.mkstemp(suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        with _gcs_errors(path):
            _blob(path).download_to_filename(tmp)
    except OSError:
        if os.path.exists(tmp):  # the client removes it itself on some errors
            os.remove(tmp)
        raise
    return tmp


def remove(path: str) -> None:
    if is_gcs(path):
        with _gcs_errors(path):
            _blob(path).delete()
    elif os.path.exists(path):
        os.remove(path)
