#!/usr/bin/env bash
# Scores every finished run of the Fashion-MNIST modern sweep with test-time flips, raw and EMA
# weights, and writes flip_eval.csv beside this script:
#     bash docs/results/fmnist_modern/flip_eval.sh [SWEEP_DIR]
# Each score is scripts/eval.py's JSON in the run's workdir (eval_flip_raw.json,
# eval_flip_ema.json); a run already scored is not scored again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
root=${1:-workdirs/sweeps/fashion_mnist_modern}
python=${PYTHON:-.venv/bin/python}
for run in "$root"/change-*/seed*; do
  [ -f "$run/results.json" ] || continue
  change=$(basename "$(dirname "$run")"); change=${change#change-}
  for weights in raw ema; do
    out=$run/eval_flip_$weights.json
    [ -f "$out" ] && continue
    flag=--noema; [ $weights = ema ] && flag=--ema
    "$python" scripts/eval.py --config="configs/fashion_mnist_modern.py:change=$change" \
      --config.eval_flip=True $flag --workdir="$run" --output="$out"
  done
done
"$python" - "$root" > docs/results/fmnist_modern/flip_eval.csv <<'PY'
import csv, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
out = csv.writer(sys.stdout, lineterminator="\n")
out.writerow(["run", "top1_error", "flip_top1_error", "ema_top1_error", "ema_flip_top1_error"])
for run in sorted(root.glob("change-*/seed*")):
    if not (run / "results.json").exists():
        continue
    results = json.loads((run / "results.json").read_text())
    raw, ema = (json.loads((run / f"eval_flip_{w}.json").read_text()) for w in ("raw", "ema"))
    out.writerow([run.relative_to(root).as_posix()] + [f"{x:.2f}" for x in (
        results["top1_error"], raw["top1_error"], results["ema_top1_error"], ema["top1_error"])])
PY
