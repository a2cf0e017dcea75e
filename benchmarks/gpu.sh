#!/usr/bin/env bash
# The project on a GPU, measured in one run:
#   bash benchmarks/gpu.sh
# On a machine without a GPU it says so and exits 0. With one, it installs the wheels
# carried in .whl/ (if any), then prints the encoder's images/s, the train
# step's real tokens/s with and without XLA and its MFU (benchmarks/gpu_throughput.py), and the
# SavedModel's greedy and beam-3 latency on a small export it trains for the purpose
# (benchmarks/serving_latency.py). Every figure comes with the command that printed it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no GPU on this machine (nvidia-smi lists none): nothing to measure"
  exit 0
fi
nvidia-smi -L
date -u +"%Y-%m-%d %H:%M UTC"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: could not install the wheels in .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import tensorflow, apache_beam, tensorflow_text" 2>/dev/null; then
  echo "error: $PY cannot import tensorflow, apache_beam and tensorflow_text here; carry them as wheels in .whl/"
  exit 1
fi
if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
  echo "error: TensorFlow sees no GPU although nvidia-smi does (its CUDA libraries: tensorflow[and-cuda])"
  exit 1
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
set -e

echo "== python -m benchmarks.gpu_throughput"
"$PY" -m benchmarks.gpu_throughput

echo "== SavedModel latency on a small export (scene set, random encoder, 1 epoch)"
work=$(mktemp -d)
"$PY" -m pipelines.synthetic --output "$work/coco" --train 256 --val 32 --seed 0 >/dev/null
"$PY" -m pipelines.preprocess --coco-dir "$work/coco" --output "$work/data" --encoder-weights random \
  --num-shards train=2,val=1 2>/dev/null | tail -1
"$PY" -m trainer.task --data "$work/data" --job-dir "$work/job" --epochs 1 --no-eval --no-progress 2>/dev/null | tail -1
images=("$work"/coco/val2014/*.jpg)
image=${images[0]}
echo "== python -m benchmarks.serving_latency --model JOB/export --image $(basename "$image")"
"$PY" -m benchmarks.serving_latency --model "$work/job/export" --image "$image"
