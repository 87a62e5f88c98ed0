#!/usr/bin/env bash
# Scores every finished run of the Fashion-MNIST modern sweep with and without test-time flips,
# raw and EMA weights, and writes flip_eval.csv beside this script:
#     bash docs/results/fmnist_modern/flip_eval.sh [SWEEP_DIR]
# A run's own results.json holds the scores of the way it evaluated (with flips if its config
# has eval_flip=True); the other way is scored by scripts/eval.py into its workdir
# (eval_flip_{raw,ema}.json, or eval_plain_{raw,ema}.json for a run that evaluated with flips).
# A run already scored is not scored again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
root=${1:-workdirs/sweeps/fashion_mnist_modern}
python=${PYTHON:-.venv/bin/python}
score() {  # run change flip weights out
  if [ -f "$5" ]; then return; fi
  local flag=--noema; [ "$4" = ema ] && flag=--ema
  "$python" scripts/eval.py --config="configs/fashion_mnist_modern.py:change=$2" \
    --config.eval_flip="$3" $flag --workdir="$1" --output="$5"
}
for run in "$root"/change-*/seed*; do
  [ -f "$run/results.json" ] || continue
  change=$(basename "$(dirname "$run")"); change=${change#change-}
  flipped=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['config'].get('eval_flip', False))" "$run/results.json")
  for weights in raw ema; do
    if [ "$flipped" = True ]; then  # results.json holds the flip scores
      score "$run" "$change" False $weights "$run/eval_plain_$weights.json"
    else
      score "$run" "$change" True $weights "$run/eval_flip_$weights.json"
    fi
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
    scores = [results["top1_error"], results["ema_top1_error"]]
    other = "plain" if results["config"].get("eval_flip", False) else "flip"
    others = [json.loads((run / f"eval_{other}_{w}.json").read_text())["top1_error"]
              for w in ("raw", "ema")]
    plain, flip = (others, scores) if other == "plain" else (scores, others)
    out.writerow([run.relative_to(root).as_posix()] + [f"{x:.2f}" for x in (
        plain[0], flip[0], plain[1], flip[1])])
PY
