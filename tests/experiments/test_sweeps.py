"""scripts/sweep.py: expanding a family into runs, printed commands, skip, resume, failures."""

import io
import json
import pathlib
import shlex
import signal
import subprocess
import sys

import pytest

from resnext_jax.experiments import sweeps

# A family of two tiny ResNeXts on synthetic data: its runs take seconds.
TINY_FAMILY = """
from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.config_module("default")


def get_config(arg="cw=2x16d"):
    args = config_files.parse_family_args(arg, allowed={"cw": ("2x16d", "4x8d")},
                                          defaults={"cw": "2x16d"})
    c, d = args["cw"].removesuffix("d").split("x")
    config = default.get_config()
    config.model = variants.model_config("_tiny_resnext", cardinality=int(c),
                                         base_width=int(d), bn_group_size=8)
    config.dataset.name = "synthetic"
    config.dataset.image_size = 8
    config.dataset.num_train_examples = 64
    config.dataset.num_eval_examples = 16
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_epochs = 1
    config.log_every_steps = 1
    return config


def get_sweep():
    return ["cw=2x16d", "cw=4x8d"]
"""


@pytest.fixture
def family(tmp_path):
    path = tmp_path / "tiny_family.py"
    path.write_text(TINY_FAMILY)
    return path


def sweep_script(*args):
    return subprocess.run([sys.executable, "scripts/sweep.py", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_expand_table3_into_runs_with_overrides():
    overrides = ["--config.max_steps=2", "--config.model.dtype=bfloat16"]
    runs = sweeps.expand("configs/table3.py", 3, "sweeps/t3", overrides, python="python")
    assert len(runs) == 30 and len({r.workdir for r in runs}) == 30
    assert [(r.setting, r.seed) for r in runs[9:11]] == [
        ("depth=101,cw=32x4d", 0),  # seed-major: every setting's seed 0 comes first
        ("depth=50,cw=1x64d", 1),
    ]
    run = runs[-1]  # the last setting, seed 2
    assert (run.setting, run.seed) == ("depth=101,cw=32x4d", 2)
    assert run.workdir == "sweeps/t3/depth-101_cw-32x4d/seed2"
    assert run.command == (
        "python",
        "scripts/train.py",
        "--config=configs/table3.py:depth=101,cw=32x4d",
        "--workdir=sweeps/t3/depth-101_cw-32x4d/seed2",
        "--config.seed=2",
        *overrides,
    )
    for r in runs:
        assert r.command[-2:] == tuple(overrides) and f"--config.seed={r.seed}" in r.command
        assert r.config["seed"] == r.seed and r.config["max_steps"] == 2
        assert r.config["model"]["dtype"] == "bfloat16"
    assert {(r.config["model"]["depth"], r.config["model"]["cardinality"]) for r in runs} == {
        (depth, c) for depth in (50, 101) for c in (1, 2, 4, 8, 32)}  # fmt: skip


def test_a_sweep_under_a_fixed_family_argument():
    runs = sweeps.expand("configs/table3.py:recipe=a2", 1, "sweeps/t3", python="python")
    assert len(runs) == 10 and runs[0].setting == "depth=50,cw=1x64d,recipe=a2"
    assert runs[0].workdir == "sweeps/t3/depth-50_cw-1x64d_recipe-a2/seed0"
    assert "--config=configs/table3.py:depth=50,cw=1x64d,recipe=a2" in runs[0].command
    assert {r.config["optimizer"] for r in runs} == {"lamb"}


@pytest.mark.slow
def test_bad_sweeps_fail_before_running_anything():
    with pytest.raises(sweeps.SweepError, match="not a config family: it has no get_sweep"):
        sweeps.expand("configs/fashion_mnist.py", 1, "r")
    with pytest.raises(sweeps.SweepError, match=r"already vary \['depth'\]"):
        sweeps.expand("configs/table3.py:depth=50", 1, "r")
    with pytest.raises(sweeps.SweepError, match='Did you mean "seed" instead of "sede"'):
        sweeps.expand("configs/table3.py", 1, "r", ["--config.sede=3"])
    with pytest.raises(sweeps.SweepError, match="invalid literal for int"):
        sweeps.expand("configs/table3.py", 1, "r", ["--config.batch_size=many"])
    with pytest.raises(sweeps.SweepError, match="cardinality and model.base_width must be"):
        sweeps.expand("configs/table3.py", 1, "r", ["--config.model.cardinality=0"])
    with pytest.raises(sweeps.SweepError, match="the sweep sets config.seed"):
        sweeps.expand("configs/table3.py", 2, "r", ["--config.seed=5"])
    with pytest.raises(sweeps.SweepError, match="at least one seed"):
        sweeps.expand("configs/table3.py", 0, "r")
    done = sweep_script("--config=configs/cifar.py", "--print", "--config.batch_size", "64")
    assert done.returncode == 1 and "write overrides as --config.FIELD=VALUE" in done.stderr
    done = sweep_script("--config=configs/table3.py", "--config.max_steps=2")
    assert done.returncode == 1 and "give exactly one of --run and --print" in done.stderr


@pytest.mark.slow
def test_printed_command_runs_as_is_then_counts_as_finished(family, tmp_path):
    root = tmp_path / "sweep"
    args = [f"--config={family}", f"--root={root}", "--config.max_steps=2"]
    done = sweep_script(*args, "--print")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "2 runs" in done.stderr
    first = shlex.split(lines[0])
    assert first[:3] == [".venv/bin/python" if ".venv" in sys.executable else sys.executable,
                         "scripts/train.py", f"--config={family}:cw=2x16d"]  # fmt: skip
    assert first[3:] == [f"--workdir={root}/cw-2x16d/seed0", "--config.seed=0",
                         "--config.max_steps=2"]  # fmt: skip
    manifest = json.loads((root / "sweep.json").read_text())
    assert [r["workdir"] for r in manifest["runs"]] == ["cw-2x16d/seed0", "cw-4x8d/seed0"]

    # The one real training run of these tests: the printed line, through a shell.
    ran = subprocess.run(["bash", "-c", lines[0]], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    results = json.loads((root / "cw-2x16d/seed0/results.json").read_text())
    assert (results["model"], results["seed"], results["steps"]) == ("resnext8_2x16d", 0, 2)

    done = sweep_script(*args, "--print")
    assert done.stdout.splitlines() == lines[1:] and "1 finished" in done.stderr
    # --run skips the finished run; the other fails (an interpreter that exits 1), is reported,
    # and the sweep exits 1.
    done = sweep_script(*args, "--run", "--python=/bin/false")
    assert done.returncode == 1
    assert "[1/2] cw=2x16d seed 0: " in done.stdout and "finished before, skipped" in done.stdout
    assert "WARNING" not in done.stdout  # the config train.py saved is the one planned
    assert "sweep: 1 done before, 1 failed" in done.stdout
    assert f"failed: cw=4x8d seed 0 in {root}/cw-4x8d/seed0: exit status 1" in done.stdout
    log = (root / "cw-4x8d/seed0/train.log").read_text()
    assert log.startswith("$ /bin/false scripts/train.py ")


# Stands in for train.py: fails if its workdir holds FAIL, else "trains" (writes results.json),
# resuming if a checkpoint folder is there.
FAKE_TRAIN = """
import json, pathlib, sys
workdir = pathlib.Path(sys.argv[1])
with (workdir / "launches").open("a") as f:
    f.write("launch\\n")
if (workdir / "FAIL").exists():
    sys.exit("error: boom")
sys.stdout.buffer.write(b"a stray byte \\xff: not UTF-8\\n")  # the sweep must survive it
sys.stdout.flush()
print("resuming" if (workdir / "checkpoints").exists() else "from scratch")
(workdir / "results.json").write_text(json.dumps({"config": json.loads(sys.argv[2])}))
"""


def test_run_all_skips_finished_resumes_unfinished_and_goes_on_after_a_failure(family, tmp_path):
    runs = sweeps.expand(str(family), 2, str(tmp_path / "sweep"))
    assert [(r.setting, r.seed) for r in runs] == [("cw=2x16d", 0), ("cw=4x8d", 0),
                                                   ("cw=2x16d", 1), ("cw=4x8d", 1)]  # fmt: skip
    runs = [sweeps.dataclasses.replace(r, command=(sys.executable, "-c", FAKE_TRAIN, r.workdir,
                                                   json.dumps(r.config)))
            for r in runs]  # fmt: skip
    done, unfinished, failing, fresh = (pathlib.Path(r.workdir) for r in runs)
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"config": runs[0].config}))
    (unfinished / "checkpoints").mkdir(parents=True)
    failing.mkdir(parents=True)
    (failing / "FAIL").touch()

    out = io.StringIO()
    outcomes = sweeps.run_all(runs, out=out)
    assert [o.status for o in outcomes] == ["done before", "finished", "failed", "finished"]
    assert outcomes[2].detail == "exit status 1: error: boom" and outcomes[0].detail == ""
    assert not (done / "launches").exists()
    for workdir in (unfinished, failing, fresh):
        assert (workdir / "launches").read_text() == "launch\n"
    assert (unfinished / "train.log").read_text().splitlines()[-1] == "resuming"
    assert (fresh / "train.log").read_text().splitlines()[-1] == "from scratch"
    assert "resuming\n" in out.getvalue() and "[4/4] cw=4x8d seed 1: " in out.getvalue()

    assert "a stray byte \ufffd: not UTF-8\n" in out.getvalue()

    # Run again: the failure is retried, the rest are finished. A finished run whose config
    # is not the planned one is refused, naming the fields, and so is an interrupted run (a
    # checkpoint) started under another recipe; a change in logging is not another recipe.
    (failing / "FAIL").unlink()
    stale = dict(runs[0].config, batch_size=32)
    (done / "results.json").write_text(json.dumps({"config": stale}))
    (fresh / "results.json").unlink()
    (fresh / "checkpoints" / "3").mkdir(parents=True)
    (fresh / "config.json").write_text(json.dumps(dict(runs[3].config, learning_rate=0.5)))
    (unfinished / "results.json").write_text(
        json.dumps({"config": dict(runs[1].config, log_every_steps=7)})
    )
    outcomes = sweeps.run_all(runs, out=io.StringIO())
    assert [o.status for o in outcomes] == ["refused", "done before", "finished", "refused"]
    assert "finished under another config (batch_size: 32 there, 16 here)" in outcomes[0].detail
    assert "was started under another config (learning_rate: 0.5 there, 0.1 here)" in (
        outcomes[3].detail
    )
    assert (fresh / "launches").read_text() == "launch\n"  # not launched again


def test_a_sigterm_just_before_the_launch_starts_nothing(family, tmp_path):
    run = sweeps.expand(str(family), 1, str(tmp_path / "sweep"))[0]
    run = sweeps.dataclasses.replace(run, command=(sys.executable, "-c", FAKE_TRAIN, run.workdir,
                                                   json.dumps(run.config)))  # fmt: skip
    launcher = sweeps._Launcher(".", io.StringIO())
    with launcher:
        launcher._guard._handle(signal.SIGTERM, None)  # between run_all's check and the launch
        code, last = launcher.launch(run)
    assert (code, last) == (0, "not started: the sweep was stopped")
    assert not (pathlib.Path(run.workdir) / "launches").exists()


@pytest.mark.slow
def test_sigterm_reaches_the_run_and_stops_the_sweep(family, tmp_path):
    fake = tmp_path / "fake_python"  # a "train.py" that waits, and on SIGTERM saves and exits 0
    fake.write_text("#!/bin/bash\ntrap 'echo preempted: saved; exit 0' TERM\necho started\n"
                    "sleep 60 >/dev/null 2>&1 &\nwait\n")  # fmt: skip
    fake.chmod(0o755)
    args = [f"--config={family}", "--run", f"--root={tmp_path / 'sweep'}", f"--python={fake}"]
    proc = subprocess.Popen([sys.executable, "scripts/sweep.py", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("started"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped: cw=2x16d seed 0 in " in out and out.count("preempted: saved") == 2
    assert "stopped: cw=4x8d seed 0 in " in out and "not started: the sweep was stopped" in out
    assert "rerun the same command to resume" in out
