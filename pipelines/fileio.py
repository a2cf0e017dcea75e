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
import shutil
import tempfile


TMP_MARK = ".tmp-"  # write_bytes's file before its rename: a killed process may leave one


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


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
    makedirs(os.path.dirname(path) or ".")
    # Write then rename, so a reader never sees half a file.
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str):
    return json.loads(read_text(path))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    if is_gcs(dest):
        with _gcs_errors(dest):
            _blob(dest).upload_from_filename(local_path)
    else:
        makedirs(os.path.dirname(dest) or ".")
        shutil.copyfile(local_path, dest)


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
