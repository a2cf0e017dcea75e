"""The export as TF Serving and Vertex AI take it: core TensorFlow ops only, and the REST
predict body they document maps onto serving_default with no adapter. Both checks run in
a fresh interpreter where neither this project nor tensorflow-text can be imported, as on
a serving machine."""
from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISOLATE = 'import sys; sys.modules.update({m: None for m in ("pipelines", "model", "trainer", "caption_io", ' \
          '"caption_serving", "caption_eval", "tensorflow_text")})\n'

OPS = ISOLATE + r"""
import json
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
sm = saved_model_pb2.SavedModel()
sm.ParseFromString(open(sys.argv[1] + "/saved_model.pb", "rb").read())
ops = set()
for mg in sm.meta_graphs:
    ops |= {n.op for n in mg.graph_def.node}
    for f in mg.graph_def.library.function:
        ops |= {n.op for n in f.node_def}
called = {f.signature.name for mg in sm.meta_graphs for f in mg.graph_def.library.function}
print(json.dumps({"ops": sorted(ops - called), "unregistered": sorted(o for o in ops - called
                                                                     if op_def_registry.get(o) is None)}))
"""

# TF Serving's REST API, row ("instances") format: with one named input each instance is that
# input's value, and {"b64": ...} is a binary string. The response is {"predictions": [...]},
# one object per instance holding every output (strings as UTF-8 text, unless the output's
# alias ends in "_bytes": then base64).
REST = ISOLATE + r"""
import base64, json
import tensorflow as tf
body = json.loads(sys.stdin.read())
m = tf.saved_model.load(sys.argv[1])
fn = m.signatures[body.get("signature_name", "serving_default")]
(inputs,) = [fn.structured_input_signature[1]]
(name,) = inputs  # one input: instances are its values
values = [base64.b64decode(v["b64"]) if isinstance(v, dict) else v for v in body["instances"]]
out = fn(**{name: tf.constant(values)})
n = len(values)
batch_major = {k: int(v.shape[0]) == n for k, v in out.items()}
def plain(x):
    x = x.tolist() if hasattr(x, "tolist") else x
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x.decode("utf-8") if isinstance(x, bytes) else x
predictions = [{k: plain(v.numpy()[i]) for k, v in out.items()} for i in range(n)]
print(json.dumps({"input": name, "input_dtype": inputs[name].dtype.name, "batch_major": batch_major,
                  "response": {"predictions": predictions}}))
"""

# TF Serving's warm-up: each record of assets.extra/tf_serving_warmup_requests is a
# PredictionLog whose PredictRequest it runs through the named signature as it loads the model.
WARMUP = ISOLATE + r"""
import json
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
m = tf.saved_model.load(sys.argv[1])
runs = []
for raw in tf.data.TFRecordDataset(sys.argv[1] + "/assets.extra/tf_serving_warmup_requests"):
    log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
    req = log.predict_log.request
    fn = m.signatures[req.model_spec.signature_name]
    expected = sorted(fn.structured_input_signature[1])
    out = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in req.inputs.items()})
    runs.append({"kind": log.WhichOneof("log_type"), "signature": req.model_spec.signature_name,
                 "inputs": sorted(req.inputs), "expected_inputs": expected,
                 "batch": int(out["captions"].shape[0]),
                 "captioned": int(sum(len(c) > 0 for c in out["captions"].numpy()))})
print(json.dumps(runs))
"""


def _isolated(code, export, stdin=None):
    proc = subprocess.run([sys.executable, "-c", code, export], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_export_uses_core_tensorflow_ops_only(trained_job):
    got = _isolated(OPS, os.path.join(trained_job, "export"))
    assert got["unregistered"] == [], got["unregistered"]
    forbidden = [o for o in got["ops"] if o.startswith(("TFText", "Sat")) or o in ("PyFunc", "EagerPyFunc")]
    assert forbidden == [], forbidden
    # The graph really was read: beam search, image decoding and the GRU are in it.
    assert {"DecodeImage", "While", "MatMul"} <= set(got["ops"]), got["ops"]


def test_tf_servings_documented_rest_body_maps_onto_serving_default(trained_job, scene_dir):
    from caption_serving import client

    paths = sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg")))[:2]
    blobs = [open(p, "rb").read() for p in paths]
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in blobs]})
    export = os.path.join(trained_job, "export")
    got = _isolated(REST, export, stdin=body)
    assert got["input"] == "images" and got["input_dtype"] == "string"
    assert all(got["batch_major"].values()), got["batch_major"]
    predictions = got["response"]["predictions"]
    assert not [k for k in predictions[0] if k.endswith("_bytes")]
    # The same captions as the project's own client with the export's defaults.
    loaded, info = client.load_model(export)
    mine = client.caption_batch(loaded, blobs, info["default_beam_size"], info["default_max_length"])
    assert [p["captions"] for p in predictions] == [m["caption"] for m in mine]
    assert all(p["captions"] for p in predictions)


def test_the_warmup_requests_are_predict_requests_serving_default_runs(trained_job):
    from caption_serving import warmup

    runs = _isolated(WARMUP, os.path.join(trained_job, "export"))
    assert [r["batch"] for r in runs] == list(warmup.BATCH_SIZES)
    for r in runs:
        assert r["kind"] == "predict_log" and r["signature"] == "serving_default"
        assert r["inputs"] == r["expected_inputs"] == ["images"]
        assert r["captioned"] == r["batch"]  # the sample photo went through decoding and the decoder


def test_a_request_body_for_a_big_photo_fits_vertex_and_still_captions(trained_job, scene_dir, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from caption_serving import request

    rng = np.random.default_rng(0)
    big = tmp_path / "phone.jpg"
    Image.fromarray(rng.integers(0, 255, (1800, 2400, 3), dtype=np.uint8)).save(big, quality=95)
    small = sorted(glob.glob(os.path.join(scene_dir, "val2014", "*.jpg")))[0]
    blobs = [big.read_bytes(), open(small, "rb").read()]
    assert 4 * len(blobs[0]) / 3 > request.VERTEX_MAX_REQUEST_BYTES  # as it is, it could not be sent
    proc = subprocess.run([sys.executable, "-m", "caption_serving.request", str(big), small], cwd=ROOT,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = proc.stdout
    assert len(body) <= request.VERTEX_MAX_REQUEST_BYTES
    sent = [base64.b64decode(i["b64"]) for i in json.loads(body)["instances"]]
    assert sent[1] == blobs[1]  # small enough: byte for byte
    assert max(Image.open(io.BytesIO(sent[0])).size) == request.MAX_SIDE
    got = _isolated(REST, os.path.join(trained_job, "export"), stdin=body.decode())
    assert all(p["captions"] for p in got["response"]["predictions"])
    # A body that cannot fit says so.
    tight = subprocess.run([sys.executable, "-m", "caption_serving.request", str(big), "--max-request-bytes", "1000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert tight.returncode == 2 and tight.stderr.startswith("error: 1 images do not fit in 1000 bytes")
