"""caption-serve under load: N concurrent clients on loopback for a bounded time, next to calling
the SavedModel directly in one process, in one run.

    python -m benchmarks.serve_load --model JOB_DIR/export [--clients 8] [--seconds 30] [--slice 10] [--images DIR]

A request is one image (TF Serving's columnar body, signature caption_images, the export's beam
size and maximum length), as a client captioning photos one at a time sends it. The baseline
makes the same calls directly (client.caption_batch, one image a call, back to back, in this
process) while the server sits idle. The two take turns in slices of --slice seconds until each
has run --seconds, so that whatever else the machine is doing hits both alike. The server is the
real command (python -m caption_serving.serve) in a process of its own; after a warm-up under
the same load (not counted: TensorFlow allocates for each batch size the first time it sees it)
its resident memory is read every second. Every answer is checked against the direct caption of
the same image. Printed: requests/s and p50/p95 latency for both, the ratio, errors, the
server's memory. Target: >= 0.8x the direct requests/s at 8 clients, no errors, memory flat.
"""
from __future__ import annotations

import argparse
import base64
import glob
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = "/v1/models/captioner:predict"


def scene_images(n: int) -> list[str]:
    """n generated scene images (the offline stand-in for photos), in a temporary directory."""
    from pipelines import synthetic

    out = tempfile.mkdtemp(prefix="serve_load_")
    synthetic.generate(out, n_train=1, n_val=n, seed=5)
    return sorted(glob.glob(os.path.join(out, "val2014", "*.jpg")))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


class Tally:
    """Requests answered, their latencies and errors, over the slices of one side."""

    def __init__(self):
        self.latencies, self.errors, self.seconds = [], [], 0.0

    def summary(self) -> dict:
        ms = 1000 * np.asarray(self.latencies or [float("nan")])
        return {"requests": len(self.latencies), "seconds": self.seconds,
                "requests_per_s": len(self.latencies) / max(self.seconds, 1e-9),
                "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                "errors": len(self.errors)}


# ----------------------------------------------------------------------------------- direct
def direct_slice(loaded, blobs: list[bytes], beam: int, max_length: int, seconds: float, tally: Tally) -> None:
    """The baseline: one image a call, back to back, for `seconds`."""
    from caption_serving.client import caption_batch

    start, i = time.perf_counter(), len(tally.latencies)
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        caption_batch(loaded, [blobs[i % len(blobs)]], beam, max_length)
        tally.latencies.append(time.perf_counter() - t)
        i += 1
    tally.seconds += time.perf_counter() - start


# ----------------------------------------------------------------------------------- server
def start_server(model: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "caption_serving.serve", "--model", model, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"error: caption-serve exited {proc.returncode}: {log.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models/captioner")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    sys.exit("error: caption-serve did not answer within 300 s")


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
    conn.request("POST", PREDICT, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def served_slice(port: int, bodies: list[bytes], expected: list[str], clients: int, seconds: float,
                 tally: Tally, rss: list[float], pid: int) -> None:
    """`clients` threads, each on a keep-alive connection, posting back to back for `seconds`;
    the slice lasts until the last answer is in. The server's memory is read once a second."""
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def client(c: int) -> None:
        conn, i = http.client.HTTPConnection("127.0.0.1", port, timeout=120), c + len(tally.latencies)
        while time.perf_counter() < stop_at:
            k = i % len(bodies)
            t = time.perf_counter()
            try:
                status, answer = post(conn, bodies[k])
                ok = status == 200 and answer["outputs"]["captions"] == [expected[k]]
                why = None if ok else f"{status} {str(answer)[:200]}"
            except (OSError, http.client.HTTPException, ValueError) as e:
                why = repr(e)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            took = time.perf_counter() - t
            with lock:
                if why:
                    tally.errors.append(why)
                else:
                    tally.latencies.append(took)
            i += clients

    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            rss.append(rss_mb(pid))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    sampler = threading.Thread(target=sample)
    for t in (*threads, sampler):
        t.start()
    for t in threads:
        t.join()
    tally.seconds += time.perf_counter() - start
    done.set()
    sampler.join()
    rss.append(rss_mb(pid))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an export directory")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds each side runs, in all (default 30)")
    ap.add_argument("--slice", type=float, default=10.0, help="seconds of one turn (default 10)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the counted run (default 15)")
    ap.add_argument("--images", help="a directory of JPEG/PNG images (default: 16 generated scene images)")
    args = ap.parse_args()

    from caption_io import savedmodel
    from caption_serving.client import CONTROL_DEFAULTS, ModelError, caption_batch, load_model

    paths = (sorted(glob.glob(os.path.join(args.images, "*.jpg")) + glob.glob(os.path.join(args.images, "*.png")))
             if args.images else scene_images(16))
    if not paths:
        sys.exit(f"error: --images {args.images}: no .jpg or .png files")
    blobs = [open(p, "rb").read() for p in paths]
    proc, port = start_server(args.model)  # loads while this process does
    direct, served, rss = Tally(), Tally(), []
    try:
        try:
            loaded, info = load_model(args.model)
        except ModelError as e:
            sys.exit(f"error: --model {args.model}: {e}")
        beam, max_length = savedmodel.export_beam_size(info), savedmodel.export_max_length(info)
        expected = [caption_batch(loaded, [b], beam, max_length)[0]["caption"] for b in blobs]  # warms it up too
        bodies = [json.dumps({"signature_name": "caption_images", "inputs": {
            "images": [{"b64": base64.b64encode(b).decode("ascii")}], "beam_size": beam,
            "max_length": max_length, **CONTROL_DEFAULTS}}).encode() for b in blobs]
        served_slice(port, bodies, expected, args.clients, args.warmup, Tally(), [], proc.pid)  # warm-up
        turns = max(1, math.ceil(args.seconds / args.slice))
        for _ in range(turns):
            direct_slice(loaded, blobs, beam, max_length, args.seconds / turns, direct)
            served_slice(port, bodies, expected, args.clients, args.seconds / turns, served, rss, proc.pid)
    finally:
        proc.send_signal(2)  # SIGINT: the server's own clean stop
        proc.wait(timeout=60)

    d, v = direct.summary(), served.summary()
    ratio = v["requests_per_s"] / d["requests_per_s"]
    memory = {"start_mb": rss[0], "mid_mb": rss[len(rss) // 2], "end_mb": rss[-1], "max_mb": max(rss),
              "samples": len(rss)}
    print(f"{len(blobs)} images, beam {beam}, max length {max_length}; {turns} turns of {args.seconds / turns:g} s "
          f"a side, after {args.warmup:g} s of warm-up load")
    print(f"direct (one process, one image a call): {d['requests_per_s']:.2f} requests/s, "
          f"p50 {d['p50_ms']:.0f} ms, p95 {d['p95_ms']:.0f} ms")
    print(f"caption-serve, {args.clients} concurrent clients: {v['requests_per_s']:.2f} requests/s "
          f"({ratio:.2f}x direct, target >= 0.8x), p50 {v['p50_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms, "
          f"{v['errors']} errors in {v['requests'] + v['errors']} requests")
    print(f"server memory: {memory['start_mb']:.0f} MB at the first reading, {memory['mid_mb']:.0f} MB half-way, "
          f"{memory['end_mb']:.0f} MB at the last (max {memory['max_mb']:.0f} MB, {memory['samples']} readings)")
    for e in served.errors[:3]:
        print(f"  error: {e}")
    print("RESULT " + json.dumps({"clients": args.clients, "direct": d, "served": v, "ratio": ratio, "memory": memory}))


if __name__ == "__main__":
    main()
