#!/usr/bin/env bash
# The demo, from nothing: a generated COCO-format scene set, the Beam pipeline
# over it, and (as the trainer and export land) training, export and captioning.
set -euo pipefail
OUT=${1:-demo_out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

echo "== 1/4 scene set (COCO 2014 layout) -> $OUT/coco"
# DEMO_NOVEL_PAIRS=3: three colour-shape pairs never trained on, in half the val scenes
# (docs/training.md, "Captions of new combinations").
# DEMO_LANGUAGE=zh: the captions in Chinese (docs/data.md, "Captions in any language").
"$PY" -m pipelines.synthetic --output "$OUT/coco" --train "${DEMO_TRAIN:-3000}" --val "${DEMO_VAL:-200}" --seed 0 \
  --novel-pairs "${DEMO_NOVEL_PAIRS:-0}" --language "${DEMO_LANGUAGE:-en}" >/dev/null

echo "== 2/4 Beam pipeline (DirectRunner) -> $OUT/data"
# DEMO_ENCODER=mobilenet_v3_large (or efficientnet_v2_s, convnext_tiny): another image encoder
# (docs/data.md, "The image encoder"); with random weights it tests the path, not the backbone.
# DEMO_TOKENIZER=wordpiece (or chars): what a token is.
"$PY" -m pipelines.preprocess --coco-dir "$OUT/coco" --output "$OUT/data" --overwrite \
  --encoder "${DEMO_ENCODER:-inception_v3}" --encoder-weights random --seed 0 --num-shards train=4,val=1 \
  --tokenizer "${DEMO_TOKENIZER:-words}"

echo "data directory: $OUT/data (metadata.json, vocab.txt, shards, rejected/)"

echo "== 3/4 training -> $OUT/job"
rm -rf "$OUT/job"  # a fresh job each demo (a kept job dir would resume)
# The paper's attention regulariser asks every caption to cover the whole grid over its words;
# a scene is one to three shapes on a blank background, so at the trainer's default (lambda 1)
# it spreads the attention onto the background (2.9x chance on the shapes, 3.5x at 0.1:
# docs/benchmarks.md, "The attention regulariser's λ"). The demo weakens it; on photos keep the default.
ATTENTION_REG=${DEMO_ATTENTION_REG:-0.1}
echo "attention regulariser: lambda $ATTENTION_REG (the trainer's default is 1.0; DEMO_ATTENTION_REG=1 to compare)"
# DEMO_DECODER=transformer: the Transformer decoder instead of the attention GRU.
# DEMO_SCST_EPOCHS=1: one epoch of self-critical training on CIDEr-D after them
# (docs/training.md, "Self-critical training").
"$PY" -m trainer.task --data "$OUT/data" --job-dir "$OUT/job" --epochs "${DEMO_EPOCHS:-6}" --batch-size 64 \
  --decoder "${DEMO_DECODER:-gru}" \
  --attention-reg "$ATTENTION_REG" --scst-epochs "${DEMO_SCST_EPOCHS:-0}"

echo "job directory: $OUT/job (checkpoints/, logs/ for TensorBoard, loss.png, metrics.json, export/,"
echo "               eval-val/: results.json, metrics.json, gallery/index.html)"

echo "== 4/4 captioning a held-out image with the SavedModel"
# The first image by name, from a glob: `ls | head -n 1` under pipefail could die of SIGPIPE
# (exit 141) when head closed the pipe before ls had written its last block.
VAL_IMAGES=("$OUT"/coco/val2014/*)
IMG="${VAL_IMAGES[0]}"
"$PY" -m caption_serving.caption "$IMG" --model "$OUT/job/export" --plot "$OUT/plots"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/job/metrics.json"))
print(f"training: {m['steps']} steps in {m['wall_seconds']:.0f}s; val cross-entropy "
      f"{m['initial_val_xent']:.3f} -> {m['history'][-1]['val_xent']:.3f} per token")
PYEOF
echo "image: $IMG"
echo "attention plot: $OUT/plots/"
echo "gallery: $OUT/job/eval-val/gallery/index.html"
