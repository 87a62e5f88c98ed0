"""Run (or print) every setting of a config family times seeds: one train.py run each.

    python scripts/sweep.py --config=configs/table3.py --seeds=3 --run
    python scripts/sweep.py --config=configs/table3.py --seeds=3 --print > runs.txt
    python scripts/sweep.py --config=configs/table3.py --run --config.max_steps=2  # smoke test

Run k of setting ARG trains in ROOT/<ARG as a slug>/seed<k> (ROOT defaults to
workdirs/sweeps/<family>) with --config.seed=k and every --config.FIELD=VALUE given here.
Overrides are checked against each setting's config before anything runs. --run trains the
runs one after another, skipping finished ones (results.json) and resuming interrupted ones; a
failed run is reported and the sweep goes on, exiting 1 at the end. A run whose workdir was
trained under another config (finished, or interrupted with a checkpoint) is refused, not run
or resumed, and the sweep exits 1 (README "Failure and recovery"). --print writes one shell
command per unfinished run, to be run from the repository root (a job array, xargs).
"""

import os
import sys

from absl import app, flags

from resnext_jax.devices import runtime
from resnext_jax.experiments import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", None, "a config family: a file with get_config(arg) and get_sweep()")
flags.DEFINE_integer("seeds", 1, "seeds per setting: config.seed = 0 .. seeds-1")
flags.DEFINE_string("root", None, "the sweep's directory (default: workdirs/sweeps/<family>)")
flags.DEFINE_bool("run", False, "run every unfinished run here, one after another")
flags.DEFINE_bool("print", False, "print one shell command per unfinished run")
flags.DEFINE_string("python", sys.executable, "the interpreter the commands start")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def portable(path: str) -> str:
    """Relative to the repository root if inside it (commands run from there), else absolute."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, REPO)
    return full if rel == ".." or rel.startswith("../") else rel


def split_overrides(argv):
    """(argv for absl, the --config.FIELD=VALUE overrides, passed on to every run)."""
    return ([a for a in argv if not sweeps.is_override(a)],
            [a for a in argv if sweeps.is_override(a)])  # fmt: skip


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(
            f"unexpected arguments {argv[1:]}; write overrides as --config.FIELD=VALUE"
        )
    if FLAGS.run == FLAGS.print:
        raise app.UsageError("give exactly one of --run and --print")
    path, colon, arg = FLAGS.config.partition(":")
    config = portable(path) + colon + arg  # expand() refuses the arguments with a clear error
    stem = os.path.splitext(os.path.basename(path))[0]
    root = portable(FLAGS.root) if FLAGS.root else f"workdirs/sweeps/{stem}"
    python = portable(FLAGS.python) if os.sep in FLAGS.python else FLAGS.python
    try:
        runs = sweeps.expand(config, FLAGS.seeds, root, overrides, python=python,
                             train_script="scripts/train.py", cwd=REPO)  # fmt: skip
    except sweeps.SweepError as e:
        sys.exit(f"error: {e}")
    sweeps.write_manifest(root, runs, config, FLAGS.seeds, overrides, cwd=REPO)
    todo = [r for r in runs if not sweeps.is_finished(r.workdir, REPO)]
    print(f"sweep: {len(runs)} runs in {root} ({len(runs) // FLAGS.seeds} settings x "
          f"{FLAGS.seeds} seeds), {len(runs) - len(todo)} finished", file=sys.stderr)  # fmt: skip
    if FLAGS.print:
        refused = [(r, sweeps.recipe_conflict(r, REPO)) for r in runs]
        for run in todo:
            print(run.shell())
        for run, why in filter(lambda x: x[1], refused):
            print(f"refused: {run.label} in {run.workdir}: {why}", file=sys.stderr)
        sys.exit(1 if any(why for _, why in refused) else 0)
    outcomes = sweeps.run_all(runs, cwd=REPO)
    counts = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"sweep: {', '.join(f'{n} {status}' for status, n in counts.items())}")
    for o in outcomes:
        if o.status in ("failed", "stopped", "refused") or o.detail:
            print(f"  {o.status}: {o.run.label} in {o.run.workdir}: {o.detail}")
    if counts.get("stopped"):
        print("sweep: stopped; rerun the same command to resume")
    if counts.get("failed"):
        print(f"sweep: each run's output is in its {sweeps.LOG_FILE}")
    if counts.get("failed") or counts.get("refused"):
        sys.exit(1)


if __name__ == "__main__":
    runtime.use_tcmalloc()
    absl_argv, config_overrides = split_overrides(sys.argv)
    app.run(lambda argv: main(argv, config_overrides), argv=absl_argv)
