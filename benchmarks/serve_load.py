"""caption-serve under load: N concurrent clients on loopback for a bounded time, next to calling
the SavedModel directly in one process, in one run; and the batch sizes the model runs best at.

    python -m benchmarks.serve_load --model JOB_DIR/export [--protocol rest|grpc] [--clients 8] [--seconds 30]
                                    [--slice 10] [--images DIR]
    python -m benchmarks.serve_load --model JOB_DIR/export --sweep [--sizes 1,2,4,8,16] [--seconds 30] [--rounds 3]

A request is one image (signature caption_images, the export's beam size and maximum length), as
a client captioning photos one at a time sends it: over REST, TF Serving's columnar body; over
gRPC (--protocol grpc), TF Serving's PredictRequest with the image's bytes in a string tensor,
sent with tensorflow-serving-api's PredictionServiceStub. --protocol grpc measures the REST API
too, so the two and the direct calls share one run. The baseline makes the same calls directly
(client.caption_batch, one image a call, back to back, in this process) while the server sits
idle. The sides take turns in slices of --slice seconds until each has run --seconds, so that
whatever else the machine is doing hits them alike. The server is the real command (python -m
caption_serving.serve) in a process of its own; after a warm-up under the same load (not counted:
TensorFlow allocates for each batch size the first time it sees it) its resident memory is read
every second. Every answer is checked against the direct caption of the same image. Printed:
requests/s and p50/p90/p95/p99 latency of each side, the ratios, errors, the server's memory.
Targets at 8 clients: REST >= 0.8x the direct requests/s, gRPC >= 0.9x; no errors, memory flat.

--sweep measures what TF Serving's batching parameters are made of (caption_serving/
batching_config.py): serving_default's images/s and images per CPU-second at each batch size,
with one call at a time and with two at once, in interleaved rounds; and how long a call takes.
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
PERCENTILES = (50, 90, 95, 99)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    """Requests answered, their latencies and errors, over the slices of one side."""

    def __init__(self):
        self.latencies, self.errors, self.seconds = [], [], 0.0

    def summary(self) -> dict:
        ms = 1000 * np.asarray(self.latencies or [float("nan")])
        return {"requests": len(self.latencies), "seconds": self.seconds,
                "requests_per_s": len(self.latencies) / max(self.seconds, 1e-9),
                **{f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}, "errors": len(self.errors)}


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
def start_server(model: str) -> tuple[subprocess.Popen, int, int]:
    """The real command on free loopback ports -> (its process, REST port, gRPC port), once it answers."""
    port, grpc_port = free_port(), free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "caption_serving.serve", "--model", model, "--port", str(port),
                             "--grpc-port", str(grpc_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"error: caption-serve exited {proc.returncode}: {log.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models/captioner")
            if conn.getresponse().status == 200:  # the gRPC server started before the app did
                return proc, port, grpc_port
        except OSError:
            time.sleep(0.2)
    sys.exit("error: caption-serve did not answer within 300 s")


def rest_client(port: int, blobs: list[bytes], beam: int, max_length: int, expected: list[str]):
    """-> make(): a client on a keep-alive connection of its own, whose ask(k) posts image k and
    returns None when the answer is its direct caption, else why not."""
    from caption_serving.client import CONTROL_DEFAULTS

    bodies = [json.dumps({"signature_name": "caption_images", "inputs": {
        "images": [{"b64": base64.b64encode(b).decode("ascii")}], "beam_size": beam,
        "max_length": max_length, **CONTROL_DEFAULTS}}).encode() for b in blobs]

    def make():
        conn = [http.client.HTTPConnection("127.0.0.1", port, timeout=120)]

        def ask(k: int):
            try:
                conn[0].request("POST", PREDICT, body=bodies[k], headers={"Content-Type": "application/json"})
                r = conn[0].getresponse()
                status, answer = r.status, json.loads(r.read())
                ok = status == 200 and answer["outputs"]["captions"] == [expected[k]]
                return None if ok else f"{status} {str(answer)[:200]}"
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                return repr(e)
        return ask
    return make


def grpc_client(port: int, blobs: list[bytes], beam: int, max_length: int, expected: list[str]):
    """The same over gRPC: TF Serving's stub on a channel of its own, every output answered."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from caption_serving.client import option_inputs

    requests = []
    for b in blobs:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "captioner", "caption_images"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([b], dtype=tf.string))
        for name, value in option_inputs(beam, max_length).items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        requests.append(request)

    def make():
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def ask(k: int):
            try:
                captions = list(stub.Predict(requests[k], timeout=120).outputs["captions"].string_val)
                return None if captions == [expected[k].encode("utf-8")] else f"captions {captions}"
            except grpc.RpcError as e:
                return f"{e.code()} {e.details()}"
        return ask
    return make


def served_slice(make, clients: int, n: int, seconds: float, tally: Tally, rss: list[float], pid: int) -> None:
    """`clients` threads, each asking (a client of `make`'s) for images back to back for
    `seconds`; the slice lasts until the last answer is in. The server's memory is read once a second."""
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def client(c: int) -> None:
        ask, i = make(), c + len(tally.latencies)
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            why = ask(i % n)
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


# ------------------------------------------------------------------------------------ sweep
def sweep_turn(fn, batch, threads: int, seconds: float, tally: list) -> None:
    """`threads` threads calling fn on `batch` back to back for `seconds`: tally [images,
    seconds, this process's CPU seconds, call times]. The CPU time tells a faster configuration
    from one that only took a larger share of a machine other jobs use too."""
    stop_at, lock = time.perf_counter() + seconds, threading.Lock()

    def run():
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            fn(images=batch)
            with lock:
                tally[0] += int(batch.shape[0])
                tally[3].append(time.perf_counter() - start)

    start, cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    tally[1] += time.perf_counter() - start
    tally[2] += time.process_time() - cpu


def sweep(loaded, blobs: list[bytes], sizes: list[int], seconds: float, rounds: int = 3) -> dict:
    """serving_default's images/s and seconds a call at each batch size, with one call at a
    time and two at once, the configurations taking turns over `rounds` rounds."""
    import tensorflow as tf

    fn = loaded.signatures["serving_default"]
    batches = {b: tf.constant([blobs[i % len(blobs)] for i in range(b)]) for b in sizes}
    for b in sizes:  # the first call of a shape traces and allocates: not counted
        fn(images=batches[b])
    done = {(b, t): [0, 0.0, 0.0, []] for t in (1, 2) for b in sizes}
    for _ in range(rounds):
        for (b, t), tally in done.items():
            sweep_turn(fn, batches[b], t, seconds / rounds, tally)
    return {(b, t): {"images_per_s": n / s, "images_per_cpu_s": n / cpu, "call_s": float(np.median(calls))}
            for (b, t), (n, s, cpu, calls) in done.items()}


def run_sweep(loaded, blobs: list[bytes], args) -> None:
    """The sweep's figures, and the batching parameters they suggest. On a machine other jobs
    use too, images/s mostly says how much of the CPU the process got, so the choices rest on
    images per CPU-second: the smallest batch within 3% of the best (5% fell inside the noise
    between runs); a second call at once only if it raises the best by more than 5%; a queue of
    the batches those threads clear in a minute."""
    found = sweep(loaded, blobs, [int(s) for s in args.sizes.split(",")], args.seconds, args.rounds)
    for (b, t), v in found.items():
        print(f"batch {b}, {t} call(s) at once: {v['images_per_s']:.2f} images/s, "
              f"{v['images_per_cpu_s']:.2f} images a CPU-second, {v['call_s']:.2f} s a call")
    efficiency = {k: v["images_per_cpu_s"] for k, v in found.items()}
    best = {t: max(e for (_, t_), e in efficiency.items() if t_ == t) for t in (1, 2)}
    threads = 2 if best[2] > 1.05 * best[1] else 1
    size = min(b for (b, t), e in efficiency.items() if t == threads and e >= 0.97 * best[threads])
    queue = math.floor(60 * threads / found[size, threads]["call_s"])
    print(f"suggested: max_batch_size {size}, num_batch_threads {threads}, batch_timeout_micros 0, "
          f"max_enqueued_batches {queue} (best images a CPU-second: {best[1]:.2f} one call at a time, "
          f"{best[2]:.2f} two)")
    print("RESULT " + json.dumps({f"batch {b}, {t} at once": v for (b, t), v in found.items()}))


# ------------------------------------------------------------------------------------- load
def run_load(loaded, info, blobs: list[bytes], args) -> None:
    from caption_io import savedmodel
    from caption_serving.client import caption_batch

    beam, max_length = savedmodel.export_beam_size(info), savedmodel.export_max_length(info)
    expected = [caption_batch(loaded, [b], beam, max_length)[0]["caption"] for b in blobs]  # warms it up too
    proc, port, grpc_port = start_server(args.model)
    sides = {"rest": rest_client(port, blobs, beam, max_length, expected)}
    if args.protocol == "grpc":
        sides["grpc"] = grpc_client(grpc_port, blobs, beam, max_length, expected)
    direct, tallies, rss = Tally(), {name: Tally() for name in sides}, []
    try:
        for make in sides.values():  # warm-up, not counted
            served_slice(make, args.clients, len(blobs), args.warmup / len(sides), Tally(), [], proc.pid)
        turns = max(1, math.ceil(args.seconds / args.slice))
        for _ in range(turns):
            direct_slice(loaded, blobs, beam, max_length, args.seconds / turns, direct)
            for name, make in sides.items():
                served_slice(make, args.clients, len(blobs), args.seconds / turns, tallies[name], rss, proc.pid)
    finally:
        proc.send_signal(2)  # SIGINT: the server's own clean stop
        proc.wait(timeout=60)
    report(direct, tallies, rss, args, f"{len(blobs)} images, beam {beam}, max length {max_length}; {turns} turns "
           f"of {args.seconds / turns:g} s a side, after {args.warmup:g} s of warm-up load")


def report(direct: Tally, tallies: dict[str, Tally], rss: list[float], args, heading: str) -> None:
    def latency(s):
        return ", ".join(f"p{p} {s[f'p{p}_ms']:.0f} ms" for p in PERCENTILES)

    d = direct.summary()
    print(heading)
    print(f"direct (one process, one image a call): {d['requests_per_s']:.2f} requests/s, {latency(d)}")
    result = {"clients": args.clients, "direct": d}
    for name, tally in tallies.items():
        v = tally.summary()
        v["ratio"] = v["requests_per_s"] / d["requests_per_s"]
        target = 0.9 if name == "grpc" else 0.8
        print(f"caption-serve {name}, {args.clients} concurrent clients: {v['requests_per_s']:.2f} requests/s "
              f"({v['ratio']:.2f}x direct, target >= {target}x), {latency(v)}, "
              f"{v['errors']} errors in {v['requests'] + v['errors']} requests")
        for e in tally.errors[:3]:
            print(f"  error: {e}")
        result[name] = v
    memory = {"start_mb": rss[0], "mid_mb": rss[len(rss) // 2], "end_mb": rss[-1], "max_mb": max(rss),
              "samples": len(rss)}
    print(f"server memory: {memory['start_mb']:.0f} MB at the first reading, {memory['mid_mb']:.0f} MB half-way, "
          f"{memory['end_mb']:.0f} MB at the last (max {memory['max_mb']:.0f} MB, {memory['samples']} readings)")
    print("RESULT " + json.dumps(dict(result, memory=memory)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an export directory")
    ap.add_argument("--protocol", choices=("rest", "grpc"), default="rest",
                    help="rest: REST against direct calls; grpc: gRPC and REST against direct calls")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds each side (or sweep setting) runs, in all")
    ap.add_argument("--slice", type=float, default=10.0, help="seconds of one turn (default 10)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the counted run (default 15)")
    ap.add_argument("--images", help="a directory of JPEG/PNG images (default: 16 generated scene images)")
    ap.add_argument("--sweep", action="store_true", help="measure serving_default's images/s per batch size instead")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="--sweep's batch sizes (default 1,2,4,8,16)")
    ap.add_argument("--rounds", type=int, default=3, help="--sweep's rounds: each setting's turns (default 3)")
    args = ap.parse_args()

    from caption_serving.client import ModelError, load_model

    paths = (sorted(glob.glob(os.path.join(args.images, "*.jpg")) + glob.glob(os.path.join(args.images, "*.png")))
             if args.images else scene_images(16))
    if not paths:
        sys.exit(f"error: --images {args.images}: no .jpg or .png files")
    blobs = [open(p, "rb").read() for p in paths]
    try:
        loaded, info = load_model(args.model)
    except ModelError as e:
        sys.exit(f"error: --model {args.model}: {e}")
    (run_sweep(loaded, blobs, args) if args.sweep else run_load(loaded, info, blobs, args))


if __name__ == "__main__":
    main()
