"""Distribution: two replicas compute the same update as one device; two
workers on localhost end with the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(mode, data, job, out, env=None, export=False, scst=False, decoder="gru"):
    return subprocess.Popen([sys.executable, "-m", "tests.dist_worker", mode, data, str(job), str(out)]
                            + (["--export"] if export else []) + (["--scst"] if scst else [])
                            + (["--transformer"] if decoder == "transformer" else []), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _weights(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("decoder", ["gru", "transformer"])
def test_two_mirrored_replicas_make_the_same_updates_as_one_device(decoder, small_data, tmp_path):
    """A cross-entropy epoch then two SCST steps, on one device and on two replicas. Cross-entropy:
    the loss over the global token count and gradients clipped after the all-reduce. SCST: each
    replica draws its images' samples as one device draws them (their place in the global batch),
    and the loss divides by the global count of sampled tokens. The same updates, so the same weights."""
    # Side by side: most of each process is starting TensorFlow and tracing, which overlap.
    runs = [_run(mode, small_data, tmp_path / name, tmp_path / f"{name}.npz", scst=True, decoder=decoder)
            for mode, name in (("default", "one"), ("mirrored", "two"))]
    for proc in runs:
        _finish(proc)
    a, b = _weights(tmp_path / "one.npz"), _weights(tmp_path / "two.npz")
    assert int(a.pop("replicas")) == 1 and int(b.pop("replicas")) == 2
    assert int(a.pop("steps")) == int(b.pop("steps")) == 11
    assert int(a.pop("scst_steps")) == int(b.pop("scst_steps")) == 2
    assert str(a.pop("exported")) == str(b.pop("exported")) == ""  # --export not asked
    one, two = json.loads(str(a.pop("history"))), json.loads(str(b.pop("history")))
    assert [h.get("stage") for h in one] == [h.get("stage") for h in two] == [None, "scst"]
    assert one[1]["train_reward"] > 0
    np.testing.assert_allclose(two[0]["train_loss"], one[0]["train_loss"], rtol=1e-5)  # the cross-entropy epoch
    for k in ("train_reward", "train_baseline", "scst_loss", "sample_length"):
        np.testing.assert_allclose(two[1][k], one[1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_workers_on_localhost_end_with_the_same_weights(small_data, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(_run("multi_worker", small_data, tmp_path / "job", tmp_path / f"w{i}.npz", env=env, export=True))
    for p in procs:
        _finish(p)
    a, b = _weights(tmp_path / "w0.npz"), _weights(tmp_path / "w1.npz")
    assert int(a["replicas"]) == 2 and int(a["steps"]) == 3
    exported = [str(a.pop("exported")), str(b.pop("exported"))]
    for k in ("scst_steps", "history"):
        a.pop(k), b.pop(k)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Only the chief (worker 0) writes the job's outputs.
    assert os.path.exists(tmp_path / "job" / "metrics.json")
    assert os.path.exists(tmp_path / "job" / "checkpoints" / "checkpoint")
    assert not os.path.exists(tmp_path / "job" / "tmp" / "worker-0")
    # ... and the export: the chief wrote it, the other worker did not try.
    assert exported == [str(tmp_path / "job" / "export"), ""]
    assert os.path.exists(tmp_path / "job" / "export" / "saved_model.pb")
