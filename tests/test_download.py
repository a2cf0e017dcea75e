"""pipelines.download against a loopback HTTP server that serves zips built here.

The server speaks just enough HTTP/1.0 to test what matters: Range requests (206, 416), a
mode that ignores Range, replacement bytes (corruption), and bodies cut short. It logs
every request, so tests can assert what went over the wire. Only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import http.server
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from pipelines import download as dl
from pipelines import fetch

REPO = Path(__file__).resolve().parents[1]
ANN = "/annotations/annotations_trainval2014.zip"
TRAIN = "/zips/train2014.zip"
VAL = "/zips/val2014.zip"


# --- the data: a COCO-layout folder, and the zips COCO would serve for it ---------------

def _tiny_coco(root: Path) -> None:
    """A few solid-colour JPEGs and their captions, in the COCO layout (used only while
    pipelines.synthetic does not exist)."""
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "white", "black"]
    (root / "annotations").mkdir()
    for split, n in (("train", 6), ("val", 3)):
        folder = root / f"{split}2014"
        folder.mkdir()
        images, anns = [], []
        for i in range(1, n + 1):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            Image.new("RGB", (32, 24), colours[i % len(colours)]).save(folder / name, quality=90)
            images.append({"id": i, "file_name": name, "width": 32, "height": 24})
            anns.append({"id": 100 + i, "image_id": i, "caption": f"a {colours[i % 6]} picture"})
        (root / "annotations" / f"captions_{split}2014.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))


def _zip_folder(root: Path, folder: str, method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr(zipfile.ZipInfo(folder + "/"), b"")
        for path in sorted((root / folder).rglob("*")):
            zf.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """(source folder, {url path: zip bytes})."""
    root = tmp_path_factory.mktemp("coco_source")
    if importlib.util.find_spec("pipelines.synthetic") is not None:
        from pipelines import synthetic

        synthetic.generate(str(root), n_train=6, n_val=3, seed=0)
    else:
        _tiny_coco(root)
    assert (root / "annotations" / "captions_train2014.json").is_file()
    # Like the real zips: JSON deflated, JPEGs stored.
    return root, {ANN: _zip_folder(root, "annotations", zipfile.ZIP_DEFLATED),
                  TRAIN: _zip_folder(root, "train2014", zipfile.ZIP_STORED),
                  VAL: _zip_folder(root, "val2014", zipfile.ZIP_STORED)}


def _layout(root: Path) -> dict[str, bytes]:
    """Every file under root except the downloader's bookkeeping."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".downloads" not in p.relative_to(root).parts}


# --- the server -------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        entry = {"path": path, "range": self.headers.get("Range")}
        srv.requests.append(entry)
        body = srv.files.get(path)
        if body is None:
            entry["status"] = 404
            self.send_error(404)
            return
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", entry["range"] or "")
        if m and not srv.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(body):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))  # always the honest length
        self.end_headers()
        cuts = srv.cut.get(path)
        if cuts:  # announce it all, send only this many bytes, hang up
            payload = payload[: cuts.pop(0)]
        self.wfile.write(payload)
        entry.update(status=status, sent=len(payload))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.requests: list[dict] = []
        self.ignore_range = False
        self.cut: dict[str, list[int]] = {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def gets(self, path=None):
        return [r for r in self.requests if path is None or r["path"] == path]


@pytest.fixture
def server(coco):
    srv = _Server(coco[1])
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "pipelines.download", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _assert_one_error_line(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- happy path and idempotence ---------------------------------------------------------

def test_download_gives_standard_layout_with_identical_bytes(coco, server, tmp_path):
    source, zips = coco
    paths = dl.download(str(tmp_path), base_url=server.url)

    assert paths == [str(tmp_path / d) for d in ("annotations", "train2014", "val2014")]
    assert _layout(tmp_path) == _layout(source)
    assert (tmp_path / "annotations" / "captions_train2014.json").is_file()
    downloads = tmp_path / ".downloads"
    for name, url_path in (("annotations_trainval2014", ANN), ("train2014", TRAIN),
                           ("val2014", VAL)):
        assert (downloads / f"{name}.zip").read_bytes() == zips[url_path]  # kept by default
        marker = json.loads((downloads / f"{name}.done").read_text())
        assert marker["size"] == len(zips[url_path])
    assert not list(downloads.glob("*.part"))
    assert not list(tmp_path.rglob("*.extracting"))
    assert [r["range"] for r in server.requests] == [None, None, None]


def test_no_images_fetches_only_annotations(coco, server, tmp_path):
    dl.download(str(tmp_path), base_url=server.url, images=False)
    assert [r["path"] for r in server.requests] == [ANN]
    assert sorted(os.listdir(tmp_path)) == [".downloads", "annotations"]


@pytest.mark.parametrize("delete_zips", [False, True])
def test_second_run_touches_neither_network_nor_files(coco, server, tmp_path, delete_zips):
    first = dl.download(str(tmp_path), base_url=server.url, delete_zips=delete_zips)
    assert bool(list((tmp_path / ".downloads").glob("*.zip"))) is not delete_zips
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    server.requests.clear()

    second = dl.download(str(tmp_path), base_url=server.url, delete_zips=delete_zips)

    assert server.requests == []  # not even a HEAD
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes  # not re-extracted


def test_removed_folder_is_re_extracted_from_the_kept_zip(coco, server, tmp_path):
    dl.download(str(tmp_path), base_url=server.url)
    expected = _layout(tmp_path)
    for p in (tmp_path / "val2014").iterdir():
        p.unlink()
    (tmp_path / "val2014").rmdir()
    server.requests.clear()

    dl.download(str(tmp_path), base_url=server.url)

    assert server.requests == []
    assert _layout(tmp_path) == expected


# --- resuming ---------------------------------------------------------------------------

def test_resume_continues_a_part_file_with_range(coco, server, tmp_path):
    source, zips = coco
    have = len(zips[TRAIN]) // 3
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "train2014.zip.part").write_bytes(zips[TRAIN][:have])

    dl.download(str(tmp_path), base_url=server.url, splits=["train"])

    [get] = server.gets(TRAIN)
    assert get["range"] == f"bytes={have}-" and get["status"] == 206
    assert get["sent"] == len(zips[TRAIN]) - have  # only the rest went over the wire
    assert (tmp_path / ".downloads" / "train2014.zip").read_bytes() == zips[TRAIN]
    assert _layout(tmp_path / "train2014") == _layout(source / "train2014")


def test_server_that_ignores_range_restarts_from_zero(coco, server, tmp_path):
    source, zips = coco
    server.ignore_range = True
    part = tmp_path / "train2014.zip.part"
    part.write_bytes(b"\xff" * 1000)  # wrong bytes: appending to them would corrupt the zip

    size = fetch.fetch(server.url + TRAIN[1:], str(tmp_path / "train2014.zip"))

    [get] = server.gets(TRAIN)
    assert get["range"] == "bytes=1000-" and get["status"] == 200
    assert size == len(zips[TRAIN])
    assert (tmp_path / "train2014.zip").read_bytes() == zips[TRAIN]
    assert not part.exists()


def test_part_longer_than_the_file_is_restarted(coco, server, tmp_path):
    _, zips = coco
    (tmp_path / "val2014.zip.part").write_bytes(b"\0" * (len(zips[VAL]) + 10))

    fetch.fetch(server.url + VAL[1:], str(tmp_path / "val2014.zip"))

    assert [r["status"] for r in server.gets(VAL)] == [416, 200]
    assert (tmp_path / "val2014.zip").read_bytes() == zips[VAL]


def test_complete_part_is_kept_when_server_answers_416(coco, server, tmp_path):
    _, zips = coco  # an earlier run stopped between the last byte and the rename
    (tmp_path / "val2014.zip.part").write_bytes(zips[VAL])

    assert fetch.fetch(server.url + VAL[1:], str(tmp_path / "val2014.zip")) == len(zips[VAL])
    assert [r["status"] for r in server.gets(VAL)] == [416]
    assert (tmp_path / "val2014.zip").read_bytes() == zips[VAL]


def test_dropped_connection_is_resumed_within_one_call(coco, server, tmp_path):
    _, zips = coco
    server.cut[TRAIN] = [500]

    fetch.fetch(server.url + TRAIN[1:], str(tmp_path / "train2014.zip"), retries=1)

    assert [(r["range"], r["sent"]) for r in server.gets(TRAIN)] == [
        (None, 500), ("bytes=500-", len(zips[TRAIN]) - 500)]
    assert (tmp_path / "train2014.zip").read_bytes() == zips[TRAIN]


def test_short_body_keeps_the_part_and_reports_it(coco, server, tmp_path):
    _, zips = coco
    server.cut[TRAIN] = [700]
    dest = tmp_path / "train2014.zip"

    with pytest.raises(dl.DownloadError, match=r"incomplete.*700 of .*rerun to resume") as err:
        fetch.fetch(server.url + TRAIN[1:], str(dest), retries=0)

    assert server.url + "zips/train2014.zip" in str(err.value)
    assert not dest.exists()  # never renamed before the size matches
    assert Path(str(dest) + ".part").read_bytes() == zips[TRAIN][:700]
    fetch.fetch(server.url + TRAIN[1:], str(dest))  # the next run picks up from byte 700
    assert server.gets(TRAIN)[-1]["range"] == "bytes=700-"
    assert dest.read_bytes() == zips[TRAIN]


# --- verification -----------------------------------------------------------------------

def test_corrupted_member_is_detected_and_the_zip_deleted(coco, server, tmp_path):
    source, zips = coco
    jpeg = sorted((source / "train2014").iterdir())[2]
    good = jpeg.read_bytes()
    at = zips[TRAIN].index(good) + len(good) // 2  # a byte inside a stored JPEG
    bad = bytearray(zips[TRAIN])
    bad[at] ^= 0xFF
    server.files[TRAIN] = bytes(bad)  # same length: only the CRC check can catch it

    with pytest.raises(dl.DownloadError, match=r"failed verification.*CRC.*deleted it") as err:
        dl.download(str(tmp_path), base_url=server.url, splits=["train"])

    assert "train2014.zip" in str(err.value)
    assert not (tmp_path / ".downloads" / "train2014.zip").exists()
    assert not (tmp_path / ".downloads" / "train2014.done").exists()
    assert not (tmp_path / "train2014" / jpeg.name).exists()  # no bad image in the layout
    assert not list(tmp_path.rglob("*.extracting"))

    server.files[TRAIN] = zips[TRAIN]  # the mirror is fixed: a rerun fetches it again
    dl.download(str(tmp_path), base_url=server.url, splits=["train"])
    assert _layout(tmp_path / "train2014") == _layout(source / "train2014")


def test_truncated_zip_is_reported_by_the_cli_in_one_line(coco, server, tmp_path):
    _, zips = coco  # the server is consistent about the size, but the file is cut short
    server.files[VAL] = zips[VAL][: len(zips[VAL]) * 6 // 10]
    out = tmp_path / "coco"

    proc = _cli("--output", out, "--base-url", server.url, "--splits", "val")

    _assert_one_error_line(proc, "val2014.zip", "failed verification", "deleted it")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not (out / ".downloads" / "val2014.zip").exists()
    assert (out / "annotations" / "captions_val2014.json").is_file()  # that zip was fine


def test_zip_without_the_expected_files_is_rejected(coco, server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("annotations/instances_train2014.json", "{}")
    server.files[ANN] = buf.getvalue()

    with pytest.raises(dl.DownloadError, match=r"does not contain annotations/captions_train2014"):
        dl.download(str(tmp_path), base_url=server.url, images=False)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_zip_slip_member_is_refused_before_anything_is_written(server, tmp_path, kind):
    out = tmp_path / "out"
    escape = tmp_path / "escaped.txt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train2014/COCO_train2014_000000000001.jpg", b"fine")
        if kind == "dotdot":
            name = "train2014/../../escaped.txt"
            zf.writestr(name, b"pwned")
        elif kind == "absolute":
            name = str(escape)
            zf.writestr(zipfile.ZipInfo(name), b"pwned")  # ZipInfo keeps the leading /
        else:
            name = "train2014/link.jpg"
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, str(escape))
    server.files[TRAIN] = buf.getvalue()

    with pytest.raises(dl.DownloadError, match="failed verification") as err:
        dl.download(str(out), base_url=server.url, splits=["train"])

    assert repr(name) in str(err.value)
    assert not escape.exists()
    assert not (out / "train2014").exists()  # refused as a whole, not member by member
    assert not (out / ".downloads" / "train2014.zip").exists()


# --- errors the user sees ---------------------------------------------------------------

def test_unreachable_server_gives_one_line_and_nonzero_exit(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/"
    proc = _cli("--output", tmp_path, "--base-url", url)
    _assert_one_error_line(proc, "cannot reach", url + "annotations/annotations_trainval2014.zip",
                           "refused")
    assert proc.returncode == 1


def test_missing_file_names_the_url_and_status(server, tmp_path):
    server.files.pop(VAL)
    with pytest.raises(dl.DownloadError, match=re.escape(server.url + "zips/val2014.zip") +
                       ": HTTP 404"):
        dl.download(str(tmp_path), base_url=server.url, splits=["val"])


def test_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts the connection (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.zip"
        with pytest.raises(dl.DownloadError, match=r"timed out after 0.3 s"):
            fetch.fetch(url, str(tmp_path / "x.zip"), timeout=0.3, retries=0)


@pytest.mark.parametrize("args, flag", [
    (["--year", "2015"], "--year"),
    (["--splits", "train,test"], "--splits"),
    (["--base-url", "ftp://example.invalid/"], "--base-url"),
    (["--timeout", "0"], "--timeout"),
])
def test_bad_flag_gives_one_line_naming_it(tmp_path, args, flag):
    proc = _cli("--output", tmp_path, *args)
    _assert_one_error_line(proc, flag)
    assert proc.returncode == 2


def test_remote_output_is_refused(tmp_path):
    proc = _cli("--output", "gs://bucket/coco")
    _assert_one_error_line(proc, "--output", "local path")
    with pytest.raises(ValueError, match="local path"):
        dl.download("gs://bucket/coco")


def test_cli_success_prints_the_paths(coco, server, tmp_path):
    proc = _cli("--output", tmp_path, "--base-url", server.url, "--no-images")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no bar when stderr is not a terminal
    assert proc.stdout.splitlines()[-1] == str(tmp_path / "annotations")
