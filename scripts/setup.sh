#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the pinned requirements and this
# package, and (where apt can install it) Debian's Fashion-MNIST for the offline default.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test-only dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
if [[ "${1:-}" == "--test" && -f requirements-test.txt ]]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
data=/usr/share/datasets/fashion-mnist
if [[ ! -f $data/train-images-idx3-ubyte.gz ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist with apt-get" >&2
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist with apt-get" >&2
  else
    echo "setup: Fashion-MNIST is not in $data; install Debian's dataset-fashion-mnist" \
      "or set --config.dataset.data_dir to a folder with the four IDX files" >&2
  fi
fi
echo "setup: done (.venv)"
