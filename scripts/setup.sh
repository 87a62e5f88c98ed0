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
# Debian packages, where apt can install them: the offline dataset, and tcmalloc, under which
# the scripts re-execute themselves because XLA CPU steps run 1.3x faster with it
# (resnext_jax/devices/runtime.py).
data=/usr/share/datasets/fashion-mnist
packages=()
[[ -f $data/train-images-idx3-ubyte.gz ]] || packages+=(dataset-fashion-mnist)
.venv/bin/python -c "from resnext_jax.devices import runtime; assert runtime.tcmalloc_path()" 2>/dev/null \
  || packages+=(libtcmalloc-minimal4)
if (( ${#packages[@]} )); then
  sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo -n)
  if command -v apt-get >/dev/null && { [[ -z ${sudo[*]} ]] || sudo -n true 2>/dev/null; }; then
    ("${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "${packages[@]}") \
      >/dev/null || echo "setup: could not install ${packages[*]} with apt-get" >&2
  else
    echo "setup: could not install ${packages[*]} (no apt-get, or not root)" >&2
  fi
fi
if [[ ! -f $data/train-images-idx3-ubyte.gz ]]; then
  echo "setup: Fashion-MNIST is not in $data; install Debian's dataset-fashion-mnist" \
    "or set --config.dataset.data_dir to a folder with the four IDX files" >&2
fi
# The grouped convs' oneDNN kernels (resnext_jax/ops/onednn.py): build them now, not at first use.
# Where that cannot work (no compiler, no oneDNN) it says why; `auto` then uses XLA's convs.
.venv/bin/python -m resnext_jax.ops.onednn || true
echo "setup: done (.venv)"
