"""Evaluate a saved model: top-1 and top-5 error over the whole eval split.

    python scripts/eval.py --config=configs/X.py --workdir=DIR     # a run's latest checkpoint
    python scripts/eval.py --config=configs/X.py --checkpoint=DIR  # a converted/exported model
    python scripts/eval.py --config=configs/X.py --workdir=DIR --ema  # its moving average

With --checkpoint the model comes from the checkpoint's model.json; the config supplies the
dataset and the eval batch size.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnext_jax.devices import runtime

config_flags.DEFINE_config_file("config", None, "config file (dataset, eval batch)",
                                lock_config=True)  # fmt: skip
flags.DEFINE_string("workdir", None, "a training work directory: evaluate its latest checkpoint")
flags.DEFINE_string("checkpoint", None, "a variables checkpoint folder (model.json + variables/)")
flags.DEFINE_string("output", None, "also write the result to this JSON file")
flags.DEFINE_bool("ema", False, "with --workdir: the moving average of a run with ema_decay")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    logging.set_verbosity(logging.WARNING)
    from resnext_jax.models import variants
    from resnext_jax.training import loop, steps

    try:
        run, variables = loop.load_for_eval(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint,
                                            ema=FLAGS.ema)  # fmt: skip
        result = steps.evaluate(run, variables)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    result["model"] = variants.variant_name(run.config.model)
    result["dataset"] = run.config.dataset.name
    print(
        f"{result['model']} on {result['dataset']} ({result['examples']} examples): "
        f"top-1 error {result['top1_error']:.3f}%, top-5 error {result['top5_error']:.3f}%"
    )
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    runtime.use_tcmalloc()
    app.run(main)
