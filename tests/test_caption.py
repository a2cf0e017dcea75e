"""The `caption` command: the SavedModel's captions for files and URLs, JSON with
attention, plots with one panel per word, and one clear line per bad input."""
from __future__ import annotations

import functools
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from caption_io import geometry
from caption_serving import caption, client, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caption_serving.caption", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(trained_job):
    return os.path.join(trained_job, "export")


@pytest.fixture(scope="module")
def loaded(export_dir):
    return tf.saved_model.load(export_dir)


@pytest.fixture(scope="module")
def default_max_length(export_dir):
    with open(os.path.join(export_dir, "assets.extra", "export.json")) as f:
        return json.load(f)["default_max_length"]


@pytest.fixture(scope="module")
def val_images(scene_dir):
    paths = sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg")))
    assert len(paths) >= 3
    return paths


@pytest.fixture
def direct(loaded, default_max_length):
    """What the SavedModel itself says for these image bytes."""
    def run(blobs, beam_size=3, max_length=None):
        out = loaded.signatures["caption_images"](
            images=tf.constant(blobs), **client.option_inputs(beam_size, max_length or default_max_length))
        return {k: v.numpy() for k, v in out.items()}
    return run


def read(path):
    with open(path, "rb") as f:
        return f.read()


def positions(export_dir):
    """The weights in one attention row of the export: its encoder's grid, flattened."""
    return geometry.of_encoder(client.export_info(export_dir).get("encoder")).positions


@pytest.fixture
def http_dir(tmp_path):
    """(directory, base URL): files in the directory served on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


# ---------------------------------------------------------------------------------- the tests
def test_captions_equal_the_savedmodels_for_the_same_bytes(export_dir, val_images, direct):
    paths = val_images[:3]
    proc = run_cli(*paths, "--model", export_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [] and "Traceback" not in proc.stderr
    want = [c.decode() for c in direct([read(p) for p in paths])["captions"]]
    assert all(want)
    assert proc.stdout.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, want)]


def test_one_input_prints_just_its_caption(export_dir, val_images, direct, capsys):
    assert caption.main([val_images[0], "--model", export_dir, "--beam-size", "1", "--max-length", "12"]) == 0
    want = direct([read(val_images[0])], beam_size=1, max_length=12)["captions"][0].decode()
    assert capsys.readouterr().out == want + "\n"


def test_num_captions_prints_the_n_best_and_json_lists_them(export_dir, val_images, loaded, default_max_length,
                                                            capsys):
    path = val_images[0]
    assert caption.main([path, "--model", export_dir, "--num-captions", "3", "--no-repeat-ngram", "2"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    want = client.caption_batch(loaded, [read(path)], 3, default_max_length, num_captions=3,
                                no_repeat_ngram=2)[0]["nbest"]
    assert [c for c, _ in lines] == [n["caption"] for n in want] and len(lines) == 3
    assert len({c for c, _ in lines}) == 3
    assert [float(s) for _, s in lines] == pytest.approx([n["score"] for n in want], abs=1e-3)
    assert caption.main([path, "--model", export_dir, "--num-captions", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [c["caption"] for c in row["captions"]][0] == row["caption"] and len(row["captions"]) == 2
    # More captions than the beam holds: one line naming the flag, exit 2.
    with pytest.raises(SystemExit) as e:
        caption.main([path, "--model", export_dir, "--num-captions", "4"])
    assert e.value.code == 2
    assert "--num-captions must be between 1 and --beam-size (3), got 4" in capsys.readouterr().err


def test_json_has_one_attention_row_per_word(export_dir, val_images, direct, capsys):
    paths = val_images[:2]
    assert caption.main([*paths, "--model", export_dir, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = direct([read(p) for p in paths])
    assert [r["input"] for r in rows] == paths
    for i, r in enumerate(rows):
        assert set(r) == {"input", "caption", "score", "tokens", "attention"}
        assert r["caption"] == want["captions"][i].decode()
        assert r["tokens"] == r["caption"].split() and r["tokens"]
        # Decided: <end> has no row; one row per word of the caption.
        att = np.array(r["attention"])
        assert att.shape == (len(r["tokens"]), positions(export_dir))
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)
        n_words = len(r["tokens"])
        np.testing.assert_allclose(att, want["attention"][i][:n_words], atol=1e-5)  # words come before <end>
        assert r["score"] == pytest.approx(float(want["scores"][i]), abs=1e-5)


def test_plot_is_a_png_with_one_panel_per_word(export_dir, val_images, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    # Keep every figure plot.attention_png saves, to count its panels afterwards.
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    # Two inputs with the same basename must not overwrite each other's plot.
    twin = tmp_path / "other" / os.path.basename(val_images[1])
    twin.parent.mkdir()
    shutil.copy(val_images[1], twin)
    inputs = [val_images[1], str(twin)]
    out_dir = tmp_path / "plots"
    assert caption.main([*inputs, "--model", export_dir, "--json", "--plot", str(out_dir)]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    base = os.path.basename(val_images[1])
    pngs = [out_dir / f"{base}.attention.png", out_dir / f"{base}-2.attention.png"]
    assert sorted(os.listdir(out_dir)) == sorted(p.name for p in pngs)
    assert len(figures) == 2
    for png, fig, row, source in zip(pngs, figures, rows, inputs):
        assert str(png) in out.err and source in out.err
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        panels = [ax for ax in fig.axes if ax.images]  # a panel: the image with its heat map
        assert len(panels) == len(row["tokens"]) > 0
        assert [ax.get_title() for ax in panels] == row["tokens"]


def _panel(png: bytes) -> np.ndarray:
    """The picture's area in a one-panel plot of a black picture, in grey levels: darker than the
    white page in (nearly) full rows and columns, which the title's letters do not fill."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), float)
    dark = grey < 200
    rows = np.flatnonzero(dark.sum(1) > 0.9 * dark.sum(1).max())
    cols = np.flatnonzero(dark.sum(0) > 0.9 * dark.sum(0).max())
    return grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _corners(panel: np.ndarray) -> dict:
    """Mean grey of each corner's tenth of the panel."""
    h, w = (max(n // 10, 1) for n in panel.shape)
    return {"top left": panel[:h, :w].mean(), "top right": panel[:h, -w:].mean(),
            "bottom left": panel[-h:, :w].mean(), "bottom right": panel[-h:, -w:].mean()}


def test_a_plot_over_a_non_square_grid_lights_where_the_model_looked():
    rows, columns = 7, 5
    black = np.zeros((140, 100, 3), np.uint8)  # cells of 20 x 20 pixels
    last_cell = np.eye(rows * columns)[-1]
    top_row = np.where(np.arange(rows * columns) < columns, 1 / columns, 0.0)  # row-major: the first row
    for weights, lit, unlit in [(last_cell, "bottom right", "top left"), (top_row, "top right", "bottom left")]:
        corners = _corners(_panel(plot.attention_png(black, ["word"], weights[None], (rows, columns))))
        assert corners[lit] > 100 and corners[unlit] < 30, (lit, corners)


def test_a_heat_map_puts_each_cell_rows_down_and_columns_across():
    heat = plot.heat_map(np.eye(35)[1 * 5 + 3], (7, 5), 100, 140)  # cell (row 1, column 3) of 7x5
    assert heat.shape == (140, 100)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 20 <= y < 40 and 60 <= x < 80, (y, x)


def test_a_grid_that_does_not_fit_the_attention_is_refused():
    black = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=r"35 positions.*6x6"):
        plot.attention_png(black, ["word"], np.full((1, 35), 1 / 35), (6, 6))
    with pytest.raises(ValueError, match=r"35 positions.*not a square"):  # no grid given: a square is inferred
        plot.attention_png(black, ["word"], np.full((1, 35), 1 / 35))
    assert plot.attention_png(black, ["word"], np.full((1, 49), 1 / 49)).startswith(PNG_SIGNATURE)  # 7x7


def test_urls_odd_formats_and_bad_inputs_in_one_call(export_dir, val_images, direct, http_dir, tmp_path):
    www, base = http_dir
    shutil.copy(val_images[0], www / "scene.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("<html>not a picture</html>\n")
    # A decompression bomb: a few KB of PNG, 100,010,000 pixels (the cap is 100 M).
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10001, 10000)).save(bomb)
    cmyk, tiff = tmp_path / "cmyk.jpg", tmp_path / "scene.tiff"
    Image.open(val_images[1]).convert("CMYK").save(cmyk, format="JPEG")
    Image.open(val_images[2]).save(tiff, format="TIFF")  # TF cannot decode TIFF: sent as PNG

    good = [f"{base}/scene.jpg", val_images[1], str(cmyk), str(tiff)]
    bad = {f"http://127.0.0.1:{closed_port()}/x.jpg": "cannot fetch", f"{base}/nothing.jpg": "HTTP 404",
           str(text): "not an image", str(tmp_path / "missing.jpg"): "no such file", str(bomb): "too large"}
    inputs = [good[0], *list(bad)[:3], *good[1:], *list(bad)[3:]]
    proc = run_cli(*inputs, "--model", export_dir)

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DecompressionBomb" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == len(bad), errors
    for source, reason in bad.items():
        [line] = [e for e in errors if e.startswith(f"error: {source}: ")]
        assert reason in line, line
    tiff_as_png = io.BytesIO()
    Image.open(tiff).convert("RGB").save(tiff_as_png, format="PNG")
    want = direct([read(val_images[0]), read(val_images[1]), read(cmyk), tiff_as_png.getvalue()])["captions"]
    assert proc.stdout.splitlines() == [f"{s}\t{c.decode()}" for s, c in zip(good, want)]


def test_size_cap_and_timeout(export_dir, val_images, http_dir, tmp_path, capsys):
    www, base = http_dir
    cap = os.path.getsize(val_images[0])
    big = read(val_images[0]) + b"\0"  # still a valid JPEG, one byte over the cap
    (www / "big.jpg").write_bytes(big)
    (tmp_path / "big.jpg").write_bytes(big)
    # Accepts connections (the backlog) but never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    hang = f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg"
    try:
        rc = caption.main([val_images[0], f"{base}/big.jpg", str(tmp_path / "big.jpg"), hang,
                           "--model", export_dir, "--max-bytes", str(cap), "--timeout", "0.5"])
    finally:
        silent.close()
    out = capsys.readouterr()
    assert rc == 1
    assert out.out.startswith(f"{val_images[0]}\t") and len(out.out.splitlines()) == 1
    errors = error_lines(out.err)
    assert len(errors) == 3
    assert errors[0].startswith(f"error: {base}/big.jpg: ") and "cap" in errors[0]
    assert errors[1].startswith(f"error: {tmp_path / 'big.jpg'}: ") and "cap" in errors[1]
    assert errors[2] == f"error: {hang}: timed out after 0.5 s"


def test_missing_model_dir_is_a_usage_error(val_images, tmp_path):
    missing = str(tmp_path / "no-export")
    proc = run_cli(val_images[0], "--model", missing)
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc.stderr) == [f"error: --model {missing}: no such directory"]
    assert "Traceback" not in proc.stderr


def test_invalid_model_dirs_and_flags(val_images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert caption.main([val_images[0], "--model", str(empty)]) == 2
    assert "not a SavedModel" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "saved_model.pb").write_bytes(b"not a protobuf")
    assert caption.main([val_images[0], "--model", str(junk)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --model {junk}: cannot load")
    for argv in ([val_images[0]], [val_images[0], "--model", str(junk), "--beam-size", "0"], ["--model", str(junk)]):
        with pytest.raises(SystemExit) as e:
            caption.main(argv)
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_console_script_is_installed_and_runs():
    import importlib.metadata

    # The installed package's entry point, not setup.py's text: what `pip install` made.
    [entry] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "caption"]
    assert entry.value == "caption_serving.caption:main"
    assert entry.dist is not None and entry.dist.name == "show-attend-tell"
    assert entry.load() is caption.main
    # The executable pip wrote for it, beside this interpreter (the virtualenv's bin/).
    exe = os.path.join(os.path.dirname(sys.executable), "caption")
    assert os.path.isfile(exe) and os.access(exe, os.X_OK), f"{exe}: no caption executable installed"
    # Run from elsewhere, so it finds the package through the install, not the working directory.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([exe, "--help"], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: caption ") and "--model" in proc.stdout


def test_a_transformer_export_captions_with_attention_and_plots_like_the_grus(trained_transformer_job, val_images,
                                                                            tmp_path, capsys):
    # The same command and outputs whatever decoder the export holds: its attention rows are the
    # last block's cross-attention averaged over heads, one row per word, each summing to 1.
    export_dir = os.path.join(trained_transformer_job, "export")
    paths = val_images[:2]
    assert caption.main([*paths, "--model", export_dir, "--json", "--plot", str(tmp_path / "plots")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with open(os.path.join(export_dir, "assets.extra", "export.json")) as f:
        max_length = json.load(f)["default_max_length"]
    want = tf.saved_model.load(export_dir).signatures["caption_images"](
        images=tf.constant([read(p) for p in paths]), **client.option_inputs(3, max_length))
    for i, r in enumerate(rows):
        assert r["caption"] == want["captions"][i].numpy().decode() and r["tokens"]
        att = np.array(r["attention"])
        assert att.shape == (len(r["tokens"]), positions(export_dir))
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(f"{os.path.basename(p)}.attention.png" for p in paths)
