#!/usr/bin/env bash
# ResNet-50 vs ResNeXt-50 (32x4d) training throughput on one NVIDIA GPU: our Flax models with
# bfloat16 compute (float32 parameters) beside torchvision's with bfloat16 autocast (AMP) and
# channels_last; prints scripts/benchmark.py's markdown table.
#
#   bash scripts/gpu_benchmark.sh [benchmark.py flags; they override the ones below]
#   bash scripts/gpu_benchmark.sh --batch=32 --format=json
#
# Needs a python3 (or $PYTHON) with JAX for CUDA, flax, optax, orbax-checkpoint, torch and
# torchvision; no TensorFlow. This package need not be installed: the checkout goes on
# PYTHONPATH. ml-collections (pure Python; it needs absl-py and PyYAML) is installed from .whl/
# into a temporary folder when that python lacks it. On a machine with internet, once:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0
#   echo /.whl/ >> .git/info/exclude   # keep the wheel out of git
# Without an NVIDIA GPU the same path runs on CPU at a tiny batch and resolution (a smoke run:
# its numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  wheels=(.whl/ml_collections-*.whl)
  if [[ ! -f ${wheels[0]} ]]; then
    echo "gpu_benchmark: $python cannot import ml_collections and .whl/ holds no" \
      "ml_collections wheel; see the top of scripts/gpu_benchmark.sh" >&2
    exit 1
  fi
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[0]}"
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi -L >&2
  # Batch 128 (4 BN groups of the paper's 32); 50 timed steps per row in 5 rounds.
  sizes=(--batch=128 --steps=50 --rounds=5 --warmup=5)
else
  echo "gpu_benchmark: no NVIDIA GPU; a CPU smoke run of the same path" >&2
  sizes=(--batch=2 --res=64 --steps=2 --rounds=2 --warmup=1)
fi
exec "$python" scripts/benchmark.py --models=resnet50,resnext50_32x4d --mode=train \
  --dtype=bfloat16 --torch --channels-last "${sizes[@]}" "$@"
