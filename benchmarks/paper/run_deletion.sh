#!/usr/bin/env bash
# The paper's black/white-deletion experiment (docs/definitions.md#deletion) on Fashion-MNIST, and the
# EfficientNet-Lite0 run on the bundled photos, with the project's own CLI.
# Results: benchmarks/results/paper/ (accuracy), benchmarks/results/paper/allegiance/ (derived
# from the accuracy run, see allegiance_from_shards.py),
# benchmarks/results/efficientnet/. Each run resumes from its shards/ if interrupted.
#
#   bash benchmarks/paper/run_deletion.sh [paper|allegiance|efficientnet|all]   (default: all)
#
# Models: benchmarks/paper/models/fashion_{cnn,resnet18}.onnx (benchmarks/paper/train_fashion.py);
# EfficientNet-Lite0 is exported here if missing (benchmarks/models/efficientnet_lite0.py).
# Written for a shared 2-core CPU: nice, 2 onnxruntime threads.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # the venv .ci/setup makes
ONNXSAL=${ONNXSAL:-$(dirname "$PY")/onnxsal}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
THREADS=${THREADS:-2}
MAPS=original,positive,negative,active,inactive
MODELS="benchmarks/paper/models/fashion_cnn.onnx benchmarks/paper/models/fashion_resnet18.onnx"
what=${1:-all}

if [[ $what == paper || $what == all ]]; then
  # all 10k test images, top-1 accuracy against the true labels (the paper's metric)
  nice -n 10 "$ONNXSAL" benchmark $MODELS --data fashion-mnist --methods $MAPS \
    --metric accuracy --threads "$THREADS" --out benchmarks/results/paper
fi

if [[ $what == allegiance || $what == all ]]; then
  # the allegiance metric (agreement with the clean prediction, the authors' later metric) from
  # the accuracy run's per-image predictions (no second model run), checked against a real
  # CLI allegiance run on the first 500 images
  nice -n 10 "$ONNXSAL" benchmark $MODELS --data fashion-mnist --methods $MAPS --limit 500 \
    --metric allegiance --threads "$THREADS" --out /tmp/onnxsal_allegiance_500 --quiet
  "$PY" benchmarks/paper/allegiance_from_shards.py benchmarks/results/paper \
    --out benchmarks/results/paper/allegiance --check /tmp/onnxsal_allegiance_500
fi

if [[ $what == efficientnet || $what == all ]]; then
  EFF=benchmarks/models/efficientnet_lite0.onnx
  [[ -f $EFF ]] || "$PY" benchmarks/models/efficientnet_lite0.py -o "$EFF"
  # 7 bundled photos (scikit-image), no labels: allegiance; shard size 1 so that every photo
  # is saved as soon as it is done (active/inactive need 1000 backward passes per photo)
  nice -n 10 "$ONNXSAL" benchmark "$EFF" --data skimage-samples --methods $MAPS \
    --metric allegiance --threads "$THREADS" --shard-size 1 --out benchmarks/results/efficientnet
fi
