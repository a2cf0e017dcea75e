"""Shared fixtures: a small scene set, and the same with faults mixed in; the small data set and a
small trained job of each decoder made from it, once for all of the run's workers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest
from PIL import Image

from caption_io import fileio
from pipelines import synthetic

# Every machine makes the suite's data, exports and trains in float32: auto measures the CPU and would
# choose bfloat16 where it has matrix units (tests/test_encoder_precision.py and
# tests/test_train_precision.py cover bfloat16).
os.environ.setdefault("CAPTIONER_ENCODER_PRECISION", "float32")
os.environ.setdefault("CAPTIONER_TRAIN_PRECISION", "float32")

# Small enough to encode in seconds with the random-weight InceptionV3.
N_TRAIN, N_VAL = 14, 5

# The files that take longest (make test's --durations shows them), run first: pytest-xdist hands
# a worker one file at a time (--dist loadfile), and a long file last would keep one worker busy
# while the other has nothing left to do.
LONGEST_FIRST = ("test_learning.py", "test_trainer.py", "test_job_paths.py", "test_preprocess.py",
                 "test_distributed.py", "test_epoch_metrics.py", "test_disk_full.py", "test_backbones.py",
                 "test_languages.py", "test_litert.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order


def _once_a_run(tmp_path_factory, name: str, make) -> str:
    """make(folder) once for the whole test run, shared by its pytest-xdist workers (a session
    fixture is otherwise made once a worker): the first worker to ask makes it, under a lock, and
    the others wait for it and reuse it. Those folders are read, never changed, by the tests."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = str(tmp_path_factory.mktemp(name))
        make(out)
        return out
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent     # the run's folder, above each worker's own
    out, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)      # a worker that failed making it left a part
            out.mkdir()
            make(str(out))
            done.touch()
    return str(out)


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory):
    return _once_a_run(tmp_path_factory, "scene",
                       lambda out: synthetic.generate(out, n_train=N_TRAIN, n_val=N_VAL, seed=3))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="session")
def faulty_scene(scene_dir, tmp_path_factory):
    """The scene set with one of each fault a real data set has, and a record of
    what each fault should become: {"rejected_images": {file_name: reason words},
    "rejected_captions": {text: reason words}, "odd_but_good": [file names]}."""
    out = str(tmp_path_factory.mktemp("faulty")) + "/coco"
    shutil.copytree(scene_dir, out)
    ann_path = os.path.join(out, "annotations", "captions_train2014.json")
    ann = _load(ann_path)
    images = ann["images"]
    path = lambda img: os.path.join(out, "train2014", img["file_name"])

    expect_images = {}
    # 0: truncated JPEG
    with open(path(images[0]), "rb") as f:
        data = f.read()
    with open(path(images[0]), "wb") as f:
        f.write(data[: len(data) // 2])
    expect_images[images[0]["file_name"]] = "truncated"
    # 1: empty file
    open(path(images[1]), "wb").close()
    expect_images[images[1]["file_name"]] = "empty"
    # 2: missing file
    os.remove(path(images[2]))
    expect_images[images[2]["file_name"]] = "missing"
    # 3: not an image under .jpg
    with open(path(images[3]), "w") as f:
        f.write("<html>this is not a picture</html>\n")
    expect_images[images[3]["file_name"]] = "not an image"
    # 4, 5, 6: odd formats that must still be read: greyscale, CMYK, PNG bytes named .jpg
    Image.open(path(images[4])).convert("L").save(path(images[4]), format="JPEG")
    Image.open(path(images[5])).convert("CMYK").save(path(images[5]), format="JPEG")
    Image.open(path(images[6])).save(path(images[6]), format="PNG")
    odd = [images[i]["file_name"] for i in (4, 5, 6)]

    expect_captions = {}
    img7 = images[7]["id"]
    next_id = max(a["id"] for a in ann["annotations"]) + 1
    extra = [
        {"id": next_id, "image_id": img7, "caption": "   "},                      # blank
        {"id": next_id + 1, "image_id": img7, "caption": "!!! ..."},              # blank once punctuation goes
        {"id": next_id + 2, "image_id": img7, "caption": "Un CARRÉ rouge, à gauche."},  # non-ASCII, kept
        {"id": next_id + 3, "image_id": 987654321, "caption": "a caption of no image"},
    ]
    expect_captions["   "] = "blank"
    expect_captions["!!! ..."] = "blank"
    expect_captions["a caption of no image"] = "names no image"
    dup = dict(ann["annotations"][40])  # image 8's caption, again, with the same id
    extra.append(dup)
    expect_captions[dup["caption"]] = "duplicate"
    ann["annotations"] += extra
    _dump(ann, ann_path)

    # A word only the val split uses: it must not enter the vocabulary.
    val_path = os.path.join(out, "annotations", "captions_val2014.json")
    val = _load(val_path)
    val["annotations"].append({"id": 10**9, "image_id": val["images"][0]["id"], "caption": "a zebra"})
    _dump(val, val_path)
    return {"dir": out, "rejected_images": expect_images, "rejected_captions": expect_captions,
            "odd_but_good": odd, "non_ascii": "Un CARRÉ rouge, à gauche.", "val_only_word": "zebra"}


@pytest.fixture(scope="session")
def fused_kernels():
    """The fused CPU attention kernels' op module (built on first use). make test installs g++
    where missing: a machine that still has no compiler skips, saying so; where a compiler is
    present, kernels that do not build or load fail the test (with --verbose's messages)."""
    from model import fused_attention

    try:
        return fused_attention.load()
    except fused_attention.KernelError as e:
        cxx = fused_attention.compiler()
        if cxx is None:
            pytest.skip(f"fused attention kernels not available here: {e}")
        with tempfile.TemporaryDirectory() as scratch:  # the compiler's own words, into the failure
            said = fused_attention.compile_library(cxx, fused_attention.target_flags(cxx, fused_attention.TUNED),
                                                   os.path.join(scratch, "kernels.so"))
        pytest.fail(f"the fused attention kernels did not build or load with {cxx}: {e}\n{said or ''}")


@pytest.fixture(scope="session")
def small_data(scene_dir, tmp_path_factory):
    """The small scene set through the pipeline: a data directory to train on."""
    from pipelines import preprocess

    return _once_a_run(tmp_path_factory, "small_data", lambda out: preprocess.run(
        ["--coco-dir", scene_dir, "--output", out, "--encoder-weights", "random", "--seed", "1",
         "--num-shards", "train=2,val=1"]))


def train_small_job(data: str, job: str, *flags) -> str:
    """The suite's small job: a small model trained briefly on `data`, exported to JOB/export."""
    from caption_serving import export
    from trainer import loop, task

    loop.train(task.parse_args(["--data", data, "--job-dir", job, "--units", "64", "--embedding-dim", "32",
                                "--batch-size", "8", "--epochs", "6", "--learning-rate", "3e-3", "--no-progress",
                                "--eval-images", "0", *flags]))
    export.export(job)
    return job


def _trained(small_data, tmp_path_factory, name, *flags):
    return _once_a_run(tmp_path_factory, name, lambda job: train_small_job(small_data, job, *flags))


@pytest.fixture(scope="session")
def trained_job(small_data, tmp_path_factory):
    """A small model (the GRU decoder) trained briefly on the small scene set, exported to JOB/export."""
    return _trained(small_data, tmp_path_factory, "job")


@pytest.fixture(scope="session")
def trained_transformer_job(small_data, tmp_path_factory):
    """The same with the Transformer decoder: the one small job of that family the tests share."""
    return _trained(small_data, tmp_path_factory, "transformer_job", "--decoder", "transformer")


@pytest.fixture(params=["trained_job", "trained_transformer_job"], ids=["gru", "transformer"])
def each_trained_job(request):
    """Each decoder family's small trained and exported job, in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def clean_logging():
    """Logging as it was, after a test that runs a command's main() in-process (cli.run sets up
    the command's logging)."""
    import logging

    from caption_io import cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in cli.PROJECT_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    cli._verbose = False


def exit_code(main, argv) -> int:
    """A command's exit status when its main(argv) runs in-process: what it returns, or what the
    flag parser exits with (argparse ends the process on a bad flag)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def headless_chromium(tmp_path):
    """A selenium driver for a headless Chromium (its profile under tmp_path) that keeps the
    page's console log (driver.get_log("browser")); the caller quits it. Skips where Debian's
    chromium and chromium-driver are not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver here (make test installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


GCS_BUCKET = "captioner-test"


def in_threads(work, n: int, timeout: float = 300) -> list:
    """work(0) .. work(n - 1), each in a thread of its own, all at once (concurrent clients).
    -> (i, repr(error)) of each that raised, so a test reports which client saw what."""
    import threading

    errors = []

    def one(i):
        try:
            work(i)
        except Exception as e:
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for servers and TF_CONFIG clusters)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A bucket served from memory on loopback; yields its gs:// root."""
    from gcp_storage_emulator import server as server_mod

    port = free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        # No real credentials or project lookups: nothing may leave this machine.
        mp.setenv("GOOGLE_CLOUD_PROJECT", "emulator")
        mp.setattr(fileio, "_CLIENT", None)
        try:
            yield f"gs://{GCS_BUCKET}"
        finally:
            server.stop()


class SmallDisk:
    """A tmpfs of its own, filled on demand: a real full disk (ENOSPC from the kernel)."""

    def __init__(self, path: str):
        self.path = path
        self._filler = os.path.join(path, "filler")

    def fill(self, leave: int = 0) -> None:
        """Take all the space but `leave` bytes."""
        st = os.statvfs(self.path)
        with open(self._filler, "ab") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))

    def make_room(self) -> None:
        os.remove(self._filler)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB tmpfs (mounting one needs root; make test and CI run as root)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("the disk-full tests mount a tmpfs, which needs root (make test in CI runs as root)")
    path = str(tmp_path / "disk")
    os.makedirs(path)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", path], capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"cannot mount a tmpfs for the disk-full tests ({proc.stderr.strip()}): run them as root")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", path], check=True)
