"""Tables and plots of every run under a directory, in the layout of the paper's Table 3.

    python scripts/report.py workdirs/sweeps/table3 [--out=DIR]

Writes into DIR (default: the directory's report/): report.md (top-1 error, mean ± std over
seeds with n, the paper's figure beside each cell; parameters and multiply-adds; unfinished
runs), table.csv (the same layout), settings.csv (one row per setting), runs.csv (one row per
run), and PNG plots: top-1 error vs cardinality, and train/eval error curves (Fig. 5).
A depth study (plain and residual nets at several depths, e.g. configs/degradation.py's sweep)
gets instead a plain vs residual table by depth (also depth_study.csv), train and test error vs
depth (error_vs_depth_*.png) and He et al. 2016's Fig. 6 curves (curves_by_depth_*.png).
"""

import os
import sys

from absl import app, flags

from resnext_jax.experiments import report

flags.DEFINE_string("out", None, "where the report goes (default: DIR/report)")
flags.DEFINE_bool("plots", True, "draw the PNG plots (matplotlib)")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: report.py DIR [--out=DIR2]")
    root = argv[1]
    if not os.path.isdir(root):
        sys.exit(f"error: no directory {root!r}")
    written = report.write_report(root, FLAGS.out or os.path.join(root, "report"),
                                        plots=FLAGS.plots)  # fmt: skip
    print(written["report.md"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    app.run(main)
