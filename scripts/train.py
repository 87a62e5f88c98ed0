"""Train and evaluate a model: `python scripts/train.py --config=configs/X.py [--workdir=DIR]`.

Without --workdir the run goes to workdirs/<config name>[_<config args>]. Rerunning the same
command resumes from the latest checkpoint there, under the same recipe: a config that changes
the experiment is refused unless --accept_config_change (README "Failure and recovery").
`--config.field=value` overrides any field.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnext_jax.devices import runtime

config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
flags.DEFINE_string("workdir", None, "work directory (default: workdirs/<config name>)")
flags.DEFINE_bool(
    "accept_config_change",
    False,
    "resume a workdir under a config that changes its experiment (recorded)",
)
flags.DEFINE_bool("distributed", False, "join a multi-process run (README: Pods and clusters)")
flags.DEFINE_string("coordinator_address", "", "--distributed: process 0's host:port")
flags.DEFINE_integer("num_processes", 0, "--distributed: how many processes")
flags.DEFINE_integer("process_id", -1, "--distributed: this process's index, 0 .. N-1")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep Orbax quiet
    from resnext_jax.devices import parallel
    from resnext_jax.experiments import config_files
    from resnext_jax.training import loop

    workdir = FLAGS.workdir or config_files.default_workdir(FLAGS["config"].config_filename)
    try:
        if FLAGS.distributed:
            parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id >= 0:
            raise ValueError("--coordinator_address, --num_processes and --process_id need "
                             "--distributed")  # fmt: skip
        loop.train_and_evaluate(FLAGS.config, workdir, FLAGS.accept_config_change)
    except (loop.NonFiniteLossError, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    runtime.use_tcmalloc()
    app.run(main)
