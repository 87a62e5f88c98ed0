"""Fault injection: a run killed with SIGKILL at random moments, restarted after each kill, ends
exactly where an uninterrupted run ends.

Each kill lands at one of these moments of scripts/train.py, chosen at random: after a random
training step, inside a checkpoint save (while Orbax's temporary step folder exists), or at a
random time after the launch (startup, compilation, evaluation). The suite runs 3 kills, the
first inside a save; more with

    RESNEXT_JAX_FAULT_KILLS=30 .venv/bin/python -m pytest tests/training/test_faults.py

and RESNEXT_JAX_FAULT_SEED=N replays the kill moments of a failed run (the test prints its seed).
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from resnext_jax.experiments import config_files
from resnext_jax.training import checkpoint, logs, loop

KILLS = int(os.environ.get("RESNEXT_JAX_FAULT_KILLS", "3"))
SEED = int(os.environ.get("RESNEXT_JAX_FAULT_SEED", str(random.SystemRandom().randrange(10**6))))

# Epochs of 8 steps of a tiny ResNeXt on synthetic data, saved every 2 steps; one more epoch
# than kills (at least 4), so that every kill finds training left to interrupt.
EPOCHS = max(4, KILLS + 1)
TOTAL_STEPS = 8 * EPOCHS
CONFIG = """
from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.config_module("default")


def get_config():
    config = default.get_config()
    config.model = variants.model_config("_tiny_resnext", bn_group_size=8)
    config.dataset.name = "synthetic"
    config.dataset.image_size = 8
    config.dataset.num_train_examples = 64
    config.dataset.num_eval_examples = 20
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = EPOCHS
    config.lr_drop_epochs = (2,)
    config.learning_rate = 0.05
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    return config
""".replace("EPOCHS", str(EPOCHS))


class Launch:
    """scripts/train.py on the tiny config in `workdir`, its output read as it comes."""

    def __init__(self, config_file, workdir):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "scripts/train.py", f"--config={config_file}", f"--workdir={workdir}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        self.started = time.time()
        self.lines = []
        self.steps = 0  # training steps this launch has printed
        self.first_step_s = None  # seconds from the launch to its first step
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("step "):
                self.steps += 1
                self.first_step_s = self.first_step_s or time.time() - self.started

    def saving(self) -> bool:
        folder = self.workdir / checkpoint.CHECKPOINT_DIR
        try:
            return any(name.endswith("orbax-checkpoint-tmp") for name in os.listdir(folder))
        except FileNotFoundError:
            return False

    def kill_when(self, condition, timeout=300) -> str:
        """SIGKILL as soon as `condition()` holds; what happened."""
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            if condition():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                return "killed"
            time.sleep(0.0005)
        assert self.proc.wait() == 0, "".join(self.lines[-30:])
        return "ended first"

    def finish(self):
        assert self.proc.wait(timeout=300) == 0, "".join(self.lines[-30:])


def kill_moments(rng, kills):
    """The kind of each kill: the first inside a save, the others drawn at random."""
    kinds = ["save"] + [rng.choice(["step", "save", "time"]) for _ in range(kills - 1)]
    return kinds[:kills]


def kill_once(kind, rng, config_file, workdir, startup_s) -> str:
    """Launch the run in `workdir` and SIGKILL it at a moment of `kind` (`startup_s`: how long a
    launch takes to its first step); what happened."""
    launch = Launch(config_file, workdir)
    if kind == "step":  # after a random step of its share of those left
        left = TOTAL_STEPS - max(checkpoint_steps(workdir), default=0)
        target = rng.randint(1, max(1, min(left, 2 * TOTAL_STEPS // KILLS)))
        return f"step {target} of the launch: " + launch.kill_when(lambda: launch.steps >= target)
    if kind == "save":
        return "inside a save: " + launch.kill_when(launch.saving)
    delay = rng.uniform(0, startup_s + 1)  # startup, compiling, a step, a save or an eval
    return f"{delay:.1f} s after the launch: " + launch.kill_when(
        lambda: time.time() - launch.started > delay
    )


def params(config, workdir):
    _, variables = loop.load_for_eval(config, workdir=workdir)
    return jax.tree.map(np.asarray, variables)


@pytest.mark.slow
def test_sigkill_at_random_moments_ends_as_an_uninterrupted_run(tmp_path):
    print(f"RESNEXT_JAX_FAULT_SEED={SEED} RESNEXT_JAX_FAULT_KILLS={KILLS}")
    rng = random.Random(SEED)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch = Launch(config_file, straight)
    launch.finish()

    events = [kill_once(kind, rng, config_file, killed, launch.first_step_s)
              for kind in kill_moments(rng, KILLS)]  # fmt: skip
    Launch(config_file, killed).finish()
    print("\n".join(events))
    assert events[0] == "inside a save: killed"

    config = config_files.load_config(str(config_file))
    a, b = params(config, straight), params(config, killed)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
    done = [json.loads((w / logs.RESULTS_FILE).read_text()) for w in (straight, killed)]
    for key in ("steps", "top1_error", "top5_error", "best_top1_error", "eval_examples"):
        assert done[0][key] == pytest.approx(done[1][key], abs=1e-4), key
    # The metrics history holds every step and evaluation once, with the same values.
    rows = [logs.read_metrics(w) for w in (straight, killed)]
    assert [(r["split"], r["step"]) for r in rows[0]] == [(r["split"], r["step"]) for r in rows[1]]
    for x, y in zip(*rows, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def checkpoint_steps(workdir):
    folder = workdir / checkpoint.CHECKPOINT_DIR
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )
