"""Batch captioning on Beam (pipelines.caption_images): good images captioned exactly as the
SavedModel captions them when called directly, every bad one rejected with its reason, the
counts adding up."""
from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from caption_serving import client
from pipelines import caption_images
from pipelines.transforms import caption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def inputs(scene_dir, tmp_path_factory):
    """A folder of the scene set's val images, odd formats that must be read, and broken
    files: {"dir", "good": [paths], "bad": {path: words its reason must hold}}."""
    d = str(tmp_path_factory.mktemp("to_caption"))
    good = []
    for src in sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg"))):
        good.append(shutil.copy(src, d))
    train = sorted(glob.glob(os.path.join(scene_dir, "train2014", "*.jpg")))
    Image.open(train[0]).convert("L").save(os.path.join(d, "grey.jpg"), format="JPEG")
    Image.open(train[1]).save(os.path.join(d, "scan.tiff"), format="TIFF")  # TF cannot read TIFF: sent as PNG
    Image.open(train[2]).save(os.path.join(d, "png-named.jpg"), format="PNG")
    good += [os.path.join(d, n) for n in ("grey.jpg", "scan.tiff", "png-named.jpg")]
    bad = {}
    data = open(train[3], "rb").read()
    bad[os.path.join(d, "truncated.jpg")] = "truncated"
    open(os.path.join(d, "truncated.jpg"), "wb").write(data[: len(data) // 2])
    bad[os.path.join(d, "empty.jpg")] = "empty file"
    open(os.path.join(d, "empty.jpg"), "wb").close()
    bad[os.path.join(d, "notes.jpg")] = "not an image"
    open(os.path.join(d, "notes.jpg"), "w").write("<html>not a picture</html>")
    # 400 megapixels by its header, 45 bytes on disk: refused before anything is decoded.
    open(os.path.join(d, "bomb.png"), "wb").write(_png_header(20000, 20000))
    bad[os.path.join(d, "bomb.png")] = "too large"
    return {"dir": d, "good": good, "bad": bad}


@pytest.fixture(scope="module")
def listed_run(inputs, trained_job, tmp_path_factory):
    """One run over --images-list: every input above, a file that does not exist, and a
    relative path (relative to the list's folder)."""
    work = tmp_path_factory.mktemp("listed")
    missing = os.path.join(inputs["dir"], "gone.jpg")
    rel = os.path.relpath(inputs["good"][0], str(work))
    paths = [rel] + inputs["good"][1:] + sorted(inputs["bad"]) + [missing]
    (work / "list.txt").write_text("\n".join(paths) + "\n\n")
    out = str(work / "out")
    summary = caption_images.run(["--images-list", str(work / "list.txt"), "--model",
                                  os.path.join(trained_job, "export"), "--output", out, "--batch-size", "4"])
    rows = [json.loads(line) for f in sorted(glob.glob(os.path.join(out, "captions-*.jsonl"))) for line in open(f)]
    rejects = [json.loads(line) for f in glob.glob(os.path.join(out, "rejected", "*.jsonl")) for line in open(f)]
    return {"summary": summary, "rows": rows, "rejects": rejects, "missing": missing, "out": out,
            "first": os.path.join(str(work), rel)}


@pytest.fixture(scope="module")
def loaded(trained_job):
    return client.load_model(os.path.join(trained_job, "export"))


def test_every_good_image_captioned_as_the_savedmodel_captions_it(listed_run, inputs, loaded):
    model, info = loaded
    by_image = {os.path.normpath(r["image"]): r for r in listed_run["rows"]}
    expected = [os.path.normpath(listed_run["first"])] + inputs["good"][1:]
    assert sorted(by_image) == sorted(expected)
    blobs = []
    for path in expected:
        data, pixels, reason = caption.check.read_image(path)
        assert reason is None, path
        blobs.append(client.model_bytes(data, pixels))
    direct = client.caption_batch(model, blobs, 3, int(info["default_max_length"]))
    for path, want in zip(expected, direct):
        got = by_image[path]
        assert got["caption"] == want["caption"], path
        assert got["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-5)
        assert got["caption"], path  # a trained model says something about every scene


def test_every_bad_input_rejected_with_its_reason_and_the_counts_add_up(listed_run, inputs):
    reasons = {r["image"]: r["reason"] for r in listed_run["rejects"]}
    want = dict(inputs["bad"], **{listed_run["missing"]: "missing or unreadable"})
    assert sorted(reasons) == sorted(want)
    for path, words in want.items():
        assert words in reasons[path], (path, reasons[path])
    s = listed_run["summary"]
    assert s["inputs"] == len(inputs["good"]) + len(want)
    assert s["captioned"] == len(inputs["good"]) and s["rejected"] == len(want)
    assert s["captioned"] + s["rejected"] == s["inputs"]
    assert s["beam_size"] == 3 and s["caption_files"] == [os.path.basename(f) for f in
                                                           sorted(glob.glob(os.path.join(listed_run["out"],
                                                                                         "captions-*.jsonl")))]
    # summary.json is what run() returned: written by the pipeline's last step.
    assert json.load(open(os.path.join(listed_run["out"], caption_images.SUMMARY_FILE))) == s


def test_a_batch_the_model_cannot_read_loses_only_the_bad_image(loaded, inputs):
    # Bytes that pass no check reach the handler directly: the batch is split, not failed.
    model, _ = loaded
    handler = caption.CaptionHandler("unused", beam_size=1, max_length=10, batch_size=4)
    good = open(inputs["good"][0], "rb").read()
    results = handler.run_inference([good, b"\xff\xd8 not really a jpeg", good], model)
    assert [sorted(r.inference) for r in results] == [["caption", "score"], ["error"], ["caption", "score"]]
    assert "the model cannot read it" in results[1].inference["error"]
    assert results[0].inference == results[2].inference


def test_a_folder_with_coco_names_gives_coco_results(inputs, trained_job, tmp_path, scene_dir):
    folder = tmp_path / "val"
    folder.mkdir()
    for p in inputs["good"][:3]:
        shutil.copy(p, folder)
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "pipelines.caption_images", "--images", str(folder), "--model",
                           os.path.join(trained_job, "export"), "--output", out, "--coco-results",
                           "--beam-size", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("captioned 3 of 3 images, rejected 0"), proc.stdout
    rows = {os.path.basename(json.loads(line)["image"]): json.loads(line)["caption"]
            for f in glob.glob(os.path.join(out, "captions-*.jsonl")) for line in open(f)}
    results = json.load(open(os.path.join(out, caption_images.COCO_RESULTS_FILE)))
    ann = json.load(open(os.path.join(scene_dir, "annotations", "captions_val2014.json")))
    ids = {img["file_name"]: img["id"] for img in ann["images"]}
    assert results == sorted(({"image_id": ids[n], "caption": c} for n, c in rows.items()),
                             key=lambda r: r["image_id"])
    # Run again into the same folder: refused without --overwrite, one line, exit 2.
    again = subprocess.run([sys.executable, "-m", "pipelines.caption_images", "--images", str(folder), "--model",
                            os.path.join(trained_job, "export"), "--output", out], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --output {out} already holds results (captions-00000-of-00001.jsonl, ...); "
        "pass --overwrite to replace them"]


@pytest.mark.parametrize("flags, message", [
    (["--images", "{tmp}/nothing-*.jpg"], "--images {tmp}/nothing-*.jpg: matches no file"),
    (["--images-list", "{tmp}/no-list.txt"], "--images-list {tmp}/no-list.txt: no such file"),
    (["--images", "{tmp}", "--beam-size", "0"], "--beam-size must be at least 1, got 0"),
])
def test_bad_flags_are_one_line(flags, message, tmp_path, trained_job):
    flags = [f.format(tmp=tmp_path) for f in flags]
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(caption_images.UsageError) as e:
        caption_images.run(flags + ["--model", os.path.join(trained_job, "export"), "--output",
                                    str(tmp_path / "out")])
    assert str(e.value) == message.format(tmp=tmp_path)


def test_a_model_that_is_not_an_export_is_named(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(caption_images.UsageError) as e:
        caption_images.run(["--images", str(tmp_path), "--model", str(tmp_path), "--output", str(tmp_path / "o")])
    assert str(e.value).startswith(f"--model {tmp_path}: not a SavedModel")


def test_coco_ids_come_from_coco_file_names():
    assert caption_images.coco_id("gs://b/val2014/COCO_val2014_000000391895.jpg") == 391895
    assert caption_images.coco_id("/x/000000000139.jpg") == 139
    assert caption_images.coco_id("/x/holiday.jpg") is None
