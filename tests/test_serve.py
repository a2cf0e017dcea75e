"""caption-serve: TF Serving's REST API on the export (the documented bodies, its errors and
limits, the status endpoint), eight concurrent clients, the command's edge, and the page in
a real browser (headless Chromium)."""
from __future__ import annotations

import base64
import contextlib
import copy
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import pytest

from caption_io import savedmodel
from caption_serving import client, predict, rest, serve
from tests.conftest import free_port, headless_chromium, in_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = "/v1/models/captioner:predict"
STATUS = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""}}]}


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def _options_body(**change) -> bytes:
    """A columnar caption_images body with no images and every option, changed as asked (None: left out)."""
    inputs = dict({"images": [], "beam_size": 3, "max_length": 5}, **client.CONTROL_DEFAULTS)
    inputs.update(change)
    return json.dumps({"signature_name": "caption_images",
                       "inputs": {k: v for k, v in inputs.items() if v is not None}}).encode()


def columnar(blobs, beam_size, max_length, **controls) -> dict:
    """The option signature's columnar body: TF Serving needs every input, so each control is sent
    (decoding's defaults unless given)."""
    return {"signature_name": "caption_images",
            "inputs": {"images": [b64(b) for b in blobs], "beam_size": beam_size, "max_length": max_length,
                       **dict(client.CONTROL_DEFAULTS, **controls)}}


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(trained_job):
    return os.path.join(trained_job, "export")


@pytest.fixture(scope="module")
def served(export_dir):
    """The export loaded once, shared by every app these tests make."""
    return predict.Served(*client.load_model(export_dir))


@pytest.fixture(scope="module")
def scene_images(scene_dir):
    paths = sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg")) +
                   glob.glob(os.path.join(scene_dir, "train2014", "*.jpg")))
    assert len(paths) >= 16
    return [open(p, "rb").read() for p in paths], paths


@pytest.fixture(scope="module")
def direct(served):
    """The project's client on the SavedModel, one image a call: what each answer must equal."""
    cache = {}

    def caption(blob, beam_size, max_length):
        key = (blob, beam_size, max_length)
        if key not in cache:
            cache[key] = client.caption_batch(served.loaded, [blob], beam_size, max_length)[0]
        return cache[key]
    return caption


class LiveServer:
    """The app on a real uvicorn server on loopback, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        sock = serve.listen("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(served):
    server = LiveServer(serve.make_app(served))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


@contextlib.contextmanager
def app_with(served, **limits):
    """A client of a server of its own, with these limits (the model is the shared one)."""
    server = LiveServer(serve.make_app(served, predict.Limits(**limits)))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            yield c
    finally:
        server.stop()


def same_rows(got, want, atol=1e-4):
    """Two answers' rows (rest.rows_of / client.rows) agree: captions exactly, numbers closely."""
    assert [g["caption"] for g in got] == [w["caption"] for w in want]
    for g, w in zip(got, want):
        assert g["words"] == w["words"]
        assert abs(g["score"] - w["score"]) < atol
        np.testing.assert_allclose(g["attention"], w["attention"], atol=atol)


# ------------------------------------------------------------------------------- the REST API
def test_tf_servings_documented_row_body_gets_tf_servings_answer(api, export_dir, scene_images):
    from tests.test_serving_ready import REST, _isolated

    blobs = scene_images[0][:2]
    body = {"signature_name": "serving_default", "instances": [b64(b) for b in blobs]}
    r = api.post(PREDICT, json=body)
    assert r.status_code == 200, r.text
    mine = r.json()
    # TF Serving's answer to the same body, computed where only TensorFlow is importable.
    theirs = _isolated(REST, export_dir, stdin=json.dumps(body))["response"]
    assert list(mine) == ["predictions"] and len(mine["predictions"]) == 2
    for m, t in zip(mine["predictions"], theirs["predictions"]):
        assert set(m) == set(t) == set(savedmodel.OUTPUTS)
        n = t["lengths"]
        assert m["lengths"] == n and m["tokens"][:n] == t["tokens"][:n] and m["captions"] == t["captions"]
    # The same client code reads both answers to the same captions, scores and attention.
    same_rows(rest.rows_of(mine), rest.rows_of(theirs))
    assert all(row["words"] for row in rest.rows_of(mine))
    # One named input: an instance may also name it.
    named = api.post(PREDICT, json={"instances": [{"images": b64(b)} for b in blobs]})
    assert named.json() == mine


def test_columnar_body_with_options_and_the_versioned_url(api, scene_images, direct):
    blobs = scene_images[0][2:5]
    r = api.post(PREDICT, json=columnar(blobs, 1, 12))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert set(out) == set(savedmodel.OUTPUTS) | set(savedmodel.NBEST_OUTPUTS)
    assert len(out["captions"]) == 3 and np.asarray(out["attention"]).shape[2] == 64
    same_rows(rest.rows_of(r.json()), [direct(b, 1, 12) for b in blobs])
    # Tokens are cut to this request's longest caption (how batching cannot change an answer).
    assert len(out["tokens"][0]) == max(out["lengths"])
    versioned = api.post("/v1/models/captioner/versions/1:predict", json=columnar(blobs, 1, 12))
    assert versioned.json() == r.json()


def test_scalar_inputs_in_the_row_format_are_refused_as_tf_serving_does(api, scene_images):
    body = {"signature_name": "caption_images",
            "instances": [{"images": b64(scene_images[0][0]), "beam_size": 1, "max_length": 8}]}
    r = api.post(PREDICT, json=body)
    assert r.status_code == 400
    assert "beam_size" in r.json()["error"] and "columnar" in r.json()["error"]


def test_a_bad_image_is_a_400_in_tf_servings_error_shape(api, scene_images):
    good = scene_images[0][0]
    for bad, reason in ((b"<html>not a picture</html>", "not an image"), (good[: len(good) // 2], "truncated"),
                        (b"", "empty")):
        r = api.post(PREDICT, json={"instances": [b64(good), b64(bad)]})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert list(r.json()) == ["error"]
        assert r.json()["error"].startswith("images[1]: ") and reason in r.json()["error"], r.json()
    r = api.post(PREDICT, json={"instances": [{"b64": "not base64!"}]})
    assert r.status_code == 400 and "base64" in r.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "JSON Parse error"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"signature_name": "nope", "instances": []}', 400, "nope"),
    (b'{"signature_name": "caption_images"}', 400, "exactly one of"),
    (b'{"instances": [], "inputs": []}', 400, "exactly one of"),
    (_options_body(max_length=None), 400, "missing ['max_length']"),
    (_options_body(beam_size=0), 400, "beam_size must be at least 1"),
    (_options_body(num_captions=0), 400, "num_captions must be at least 1"),
    (_options_body(beam_size=2.5), 400, "expected an integer"),
    (b'{"instances": [["a", "b"], "c"]}', 400, "ragged"),
    (b'{"instances": []}', 400, "no images in the request"),
])
def test_requests_tf_serving_refuses(api, body, status, words):
    r = api.post(PREDICT, content=body)
    assert r.status_code == status and list(r.json()) == ["error"]
    assert words in r.json()["error"], r.json()


def test_unknown_models_versions_and_routes_are_404s(api):
    for method, path, words in (("POST", "/v1/models/other:predict", "Latest(other)"),
                                ("GET", "/v1/models/captioner/versions/2", "Specific(captioner, 2)"),
                                ("GET", "/v1/models/captioner/signatures", "Malformed request"),
                                ("POST", "/v1/models/captioner/metadata:predict", "Malformed request"),
                                ("POST", "/v1/models/captioner:classify", "Malformed request"),
                                ("GET", "/nothing/here", "Not Found")):
        r = api.request(method, path)
        assert r.status_code == 404 and words in r.json()["error"], (path, r.text)


def test_the_status_endpoint_answers_as_tf_serving(api):
    for path in ("/v1/models/captioner", "/v1/models/captioner/versions/1"):
        r = api.get(path)
        assert r.status_code == 200 and r.json() == STATUS


def test_an_oversized_body_is_a_413(served, scene_images):
    body = json.dumps({"instances": [b64(scene_images[0][0])]}).encode()
    with app_with(served, max_body_bytes=len(body) - 1) as c:
        declared = c.post(PREDICT, content=body)
        streamed = c.post(PREDICT, content=iter([body[:1000], body[1000:]]))  # chunked: no Content-Length
    for r in (declared, streamed):
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]
    assert "content-length" not in streamed.request.headers


def test_the_pixel_cap_and_the_timeout(served, scene_images):
    body = {"instances": [b64(scene_images[0][0])]}
    with app_with(served, max_pixels=320 * 240 - 1) as c:
        r = c.post(PREDICT, json=body)
    assert r.status_code == 400 and "image too large (320x240 pixels, the cap is 76799)" in r.json()["error"]
    with app_with(served, timeout=0.001) as c:
        r = c.post(PREDICT, json=body)
    assert r.status_code == 504 and "--timeout" in r.json()["error"]


def test_the_page_needs_nothing_from_elsewhere(api, served):
    r = api.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    config = json.loads(page.split('<script id="config" type="application/json">')[1].split("</script>")[0])
    assert config["predict"] == PREDICT and config["signature"] == "caption_images"
    assert config["beam_size"] == served.info["default_beam_size"]
    assert config["num_captions"] is True  # this export decodes the n best captions of the beam
    # The controls the page does not offer go at decoding's defaults (TF Serving needs every input).
    assert config["fixed"] == {k: v for k, v in client.CONTROL_DEFAULTS.items() if k != "num_captions"}


def test_an_export_made_before_n_best_gets_no_number_of_captions_control(served, scene_images):
    # An older export's caption_images takes beam_size and max_length only: the page shows the
    # control disabled and sends none of the controls.
    older = copy.copy(served)
    older.specs = {**served.specs, "caption_images": {k: v for k, v in served.specs["caption_images"].items()
                                                      if k not in client.CONTROL_DEFAULTS}}
    config = older.page_config(predict.Limits())
    assert config["num_captions"] is False and config["fixed"] == {}


def _stand_in(info: dict) -> predict.Served:
    """A Served over a stand-in for a loaded export whose caption_images takes images alone:
    what page_config reads (the signature's inputs, export.json), with no model to load."""
    import tensorflow as tf

    signature = types.SimpleNamespace(structured_input_signature=((), {"images": tf.TensorSpec([None], tf.string)}))
    return predict.Served(types.SimpleNamespace(signatures={"caption_images": signature}), info)


MOBILENET = {"name": "mobilenet_v3_large", "input_size": 224, "grid": [7, 7], "channels": 960}


def _page_grid(info: dict) -> list:
    return _stand_in(info).page_config(predict.Limits())["grid"]


def test_the_page_is_told_the_exports_grid():
    assert _page_grid({"encoder": MOBILENET}) == [7, 7]
    assert _page_grid({"encoder": dict(MOBILENET, grid=[3, 5])}) == [3, 5]  # rows, columns
    # Exports made before export.json recorded the encoder's geometry hold InceptionV3's.
    assert _page_grid({"encoder": {"name": "inception_v3"}}) == [8, 8] and _page_grid({}) == [8, 8]


HEAT_JS = """
const canvas = heat(arguments[0]), ctx = canvas.getContext("2d");
return {width: canvas.width, height: canvas.height,
        grey: Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data).filter((_, i) => i % 4 === 0)};
"""


def test_the_pages_heat_map_is_columns_wide_and_rows_high(tmp_path):
    # A 3x5 grid: cell (row 1, column 3) lit, every other cell dark, at its row-major place.
    page = tmp_path / "page.html"
    page.write_text(serve._page(_stand_in({"encoder": dict(MOBILENET, grid=[3, 5])}), predict.Limits()))
    weights = np.eye(15)[1 * 5 + 3].tolist()
    browser = headless_chromium(tmp_path)
    try:
        browser.get(page.as_uri())
        drawn = browser.execute_script(HEAT_JS, weights)
    finally:
        browser.quit()
    assert (drawn["width"], drawn["height"]) == (5, 3)
    assert drawn["grey"] == [255 * w for w in weights]


# ------------------------------------------------------------------------------ concurrency
def test_eight_concurrent_clients_get_their_own_answers(live, scene_images, direct):
    blobs = scene_images[0]
    config = live_info(live)  # serving_default decodes with the export's defaults
    results, barrier = {}, threading.Barrier(8)

    def one_client(c):
        with httpx.Client(base_url=live.url, timeout=120) as http:
            barrier.wait()
            for k in range(2):
                mine = [blobs[(2 * c + k) % len(blobs)], blobs[(2 * c + k + 5) % len(blobs)]]
                beam, max_length = config["beam_size"], config["max_length"]
                if k == 1:  # row format, serving_default (the export's defaults)
                    body = {"instances": [b64(b) for b in mine]}
                else:  # two settings: requests with one are never merged with the other's
                    beam = 1 if c % 2 else beam
                    body = columnar(mine, beam, max_length)
                r = http.post(PREDICT, json=body)
                r.raise_for_status()
                results[(c, k)] = (mine, beam, max_length, r.json())

    calls_before = live.app.state.batcher.calls
    errors = in_threads(one_client, 8)
    assert not errors, errors
    assert len(results) == 16
    for mine, beam, max_length, answer in results.values():
        same_rows(rest.rows_of(answer), [direct(b, beam, max_length) for b in mine])
        # Padded to this request's longest caption, not to that of whoever shared its batch.
        items = answer["predictions"] if "predictions" in answer else [
            dict(zip(answer["outputs"], values)) for values in zip(*answer["outputs"].values())]
        assert {len(item["tokens"]) for item in items} == {max(item["lengths"] for item in items)}
    batcher = live.app.state.batcher
    assert batcher.calls - calls_before < 16 and batcher.merged >= 1, (batcher.calls, batcher.merged)


def live_info(live) -> dict:
    r = httpx.get(live.url + "/")
    return json.loads(r.text.split('<script id="config" type="application/json">')[1].split("</script>")[0])


# --------------------------------------------------------------------------- the command's edge
@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port and --grpc-port must be in 0..65535"),
    (["--timeout", "0"], "must be positive"),
    (["--max-pixels", "100000001"], "--max-pixels can be at most 100000000"),
    (["--model-name", "a/b"], "--model-name"),
    (["--nope"], "unrecognized arguments"),
])
def test_bad_flags_are_one_error_line(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_an_unusable_model_or_address_is_one_error_line(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "none"), "--port", "0", "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model {tmp_path / 'none'}: no such directory"]
    taken = serve.listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert serve.main(["--model", str(tmp_path), "--port", str(port), "--grpc-port", "0"]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port} ("), err


def test_the_console_script_serves_and_stops_on_ctrl_c(export_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "caption-serve")
    assert os.path.exists(exe), "pip install -e . installs the caption-serve console script"
    port = free_port()
    proc = subprocess.Popen([exe, "--model", export_dir, "--port", str(port), "--grpc-port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            try:
                if httpx.get(url + "/v1/models/captioner").json() == STATUS:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + PREDICT, json={"instances": [b64(b"GIF89a, but no more")]}, timeout=120)
        assert r.status_code == 400 and r.json() == {"error": "images[0]: not an image (unrecognised format)"}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err and "stopped" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- in a browser
CELLS_JS = """
const [[rows, columns], edge] = arguments, canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
const at = (x, y) => Array.from(ctx.getImageData(Math.floor(x), Math.floor(y), 1, 1).data.slice(0, 3));
const cells = [];
for (let r = 0; r < rows; r++)
  for (let c = 0; c < columns; c++)
    cells.push(at((c + 0.5) * canvas.width / columns, (r + 0.5) * canvas.height / rows));
const [r, c] = edge;  // the border between cell (r, c) and (r, c + 1)
return {cells, edge: at((c + 1) * canvas.width / columns, (r + 0.5) * canvas.height / rows)};
"""


def _heat(overlay, plain):
    """The overlay's grey, recovered from the blend (0.4 image + 0.6 grey), in [0, 1]."""
    return ((np.asarray(overlay, float) - 0.4 * np.asarray(plain, float)) / 0.6 / 255).mean(axis=-1)


def _two_word_scene(live, scene_images, config):
    """A scene image whose caption has two words that looked at different places: (path, its
    row as rest.rows_of gives it, each word's attention scaled to [0, 1] as the page draws it)."""
    with httpx.Client(base_url=live.url, timeout=120) as http:
        for blob, path in zip(*scene_images):
            body = columnar([blob], config["beam_size"], config["max_length"])
            row = rest.rows_of(http.post(PREDICT, json=body).json())[0]
            norm = [(a - a.min()) / max(a.max() - a.min(), 1e-8) for a in row["attention"]]
            if len(norm) >= 2 and np.abs(norm[0] - norm[1]).max() > 0.3:
                return path, row, norm
    pytest.fail("no scene image with two words that attend differently")


def test_the_page_in_chromium_shows_where_the_model_looked(live, scene_images, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    config = live_info(live)
    path, row, norm = _two_word_scene(live, scene_images, config)
    grid = config["grid"]  # [rows, columns]
    first = norm[0].reshape(grid)
    steps = np.abs(np.diff(first, axis=1))
    edge = [int(i) for i in np.unravel_index(np.argmax(steps), steps.shape)]

    browser = headless_chromium(tmp_path)
    try:
        browser.get(live.url + "/")
        done = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        browser.find_element(By.ID, "file").send_keys(path)
        WebDriverWait(browser, 120).until(done)
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            browser.find_element(By.ID, "message").text
        words = browser.find_elements(By.CSS_SELECTOR, "#captions li:first-child .word")
        assert [w.text for w in words] == row["words"]
        assert f"log-prob {row['score']:.3f}" in browser.find_element(By.ID, "captions").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#strip canvas")) == len(row["words"])
        assert not browser.find_element(By.ID, "count").get_attribute("disabled")  # an n-best export

        plain = browser.execute_script(CELLS_JS, grid, edge)
        ActionChains(browser).move_to_element(words[0]).perform()
        over0 = browser.execute_script(CELLS_JS, grid, edge)
        ActionChains(browser).move_to_element(words[1]).perform()
        over1 = browser.execute_script(CELLS_JS, grid, edge)
        browser.save_screenshot(str(tmp_path / "page.png"))

        assert over0["cells"] != plain["cells"] and over1["cells"] != over0["cells"]  # the overlay changed
        # Where the model looked, in the right cells: each cell's grey is that word's weight there.
        np.testing.assert_allclose(_heat(over0["cells"], plain["cells"]), norm[0], atol=0.06)
        np.testing.assert_allclose(_heat(over1["cells"], plain["cells"]), norm[1], atol=0.06)
        # Upsampled smoothly (bilinear): on a border between two cells, about their mean.
        r, c = edge
        between = _heat(over0["edge"], plain["edge"])
        assert abs(between - (first[r, c] + first[r, c + 1]) / 2) < 0.12, (between, first[r, c], first[r, c + 1])

        # The beam size control: the page asks again, and shows that beam's caption.
        greedy = rest.rows_of(httpx.post(live.url + PREDICT, json=columnar([open(path, "rb").read()], 1,
                                                                          config["max_length"]), timeout=120).json())
        beam = browser.find_element(By.ID, "beam")
        beam.clear()
        beam.send_keys("1", Keys.TAB)  # a change event
        WebDriverWait(browser, 120).until(lambda b: done(b) and b.find_elements(By.CSS_SELECTOR, "#captions li"))
        words = browser.find_elements(By.CSS_SELECTOR, "#captions li:first-child .word")
        assert [w.text for w in words] == greedy[0]["words"]

        # A file that is not an image, and one too large to send: one clear line each.
        text = tmp_path / "notes.txt"
        text.write_text("these are not pixels\n")
        browser.find_element(By.ID, "file").send_keys(str(text))
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                         == "error" and "notes.txt" in b.find_element(By.ID, "message").text)
        message = browser.find_element(By.ID, "message")
        assert message.text == "notes.txt: not an image (unrecognised format)"
        assert message.get_attribute("class") == "error"
        big = tmp_path / "huge.jpg"
        with open(big, "wb") as f:
            f.truncate(config["max_body_bytes"])  # sparse: nothing written, still too large
        browser.find_element(By.ID, "file").send_keys(str(big))
        WebDriverWait(browser, 60).until(lambda b: "huge.jpg" in b.find_element(By.ID, "message").text)
        assert browser.find_element(By.ID, "message").text.startswith("huge.jpg is too large (")
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "predict" not in e["message"]]
        assert severe == []  # nothing blocked by the page's content policy, no script errors
    finally:
        browser.quit()
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
