"""Data parallelism for real: compiled per-device steps on 8 simulated devices, and training
in two processes on loopback (jax.distributed with gloo) against one process.

Run as a script, `XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/devices/test_parallel.py [--model=NAME] IMPL...` prints as JSON what `test_compiled_step_*`
reads (each compiled train step's cross-device ops and FLOPs on 1 and on 8 devices, and the
same step under plain jit), and on stderr the table of docs/benchmarks.md, "Several devices".
"""

import collections
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
from functools import partial

import jax
import numpy as np
import pytest

from resnext_jax.data import in_memory
from resnext_jax.devices import parallel
from resnext_jax.experiments import config_files
from resnext_jax.models import variants
from resnext_jax.ops import onednn
from resnext_jax.training import logs, loop, optim, steps
from tests.fake_data import write_fake_fashion_mnist

default = config_files.config_module("default")

DEVICES = 8
ROOT = str(pathlib.Path(__file__).resolve().parents[2])


def _compiled_step_config(impl, model="_tiny_resnext"):
    config = default.get_config()
    config.model = variants.model_config(model, bn_group_size=8, conv_impl=impl)
    config.dataset.name = "synthetic"
    config.dataset.image_size = 32  # a global batch of 64 32x32 images
    config.dataset.num_train_examples = 64
    config.dataset.num_eval_examples = 64
    config.batch_size = config.eval_batch_size = 64
    return config


def inspect_compiled_steps(impls, model="_tiny_resnext") -> dict:
    """Per impl: the train step's collectives (opcode, shapes) and FLOPs on 1 and 8 devices,
    and the collectives of the same step under plain jit on 8 devices ("partitioner")."""
    config = _compiled_step_config("xla", model)
    run = steps.build_run(config)
    # The parameters do not depend on the impl: initialized once, placed on each mesh.
    state = steps.create_train_state(run, optim.create_optimizer(config, 1), jax.random.key(0))
    batch = next(run.source.train_batches(config.batch_size, 0))
    out = {}
    for impl in impls:
        for devices in (1, DEVICES):
            run = steps.build_run(_compiled_step_config(impl, model), jax.devices()[:devices])
            args = jax.device_put(state, run.replicated), run.global_batch(batch)
            compiled = steps.make_train_step(run).lower(*args).compile()
            out[f"{impl}/{devices}"] = {
                "ops": parallel.collective_ops(compiled),
                "flops": parallel.flops(compiled),
                "state_size": sum(x.size for x in jax.tree.leaves((state.params,
                                                                   state.batch_stats))),
            }  # fmt: skip
        # The same step under plain jit with a batch-sharded input, the partitioner's way.
        plain = jax.jit(
            partial(
                steps.train_step, state.replace(apply_fn=run.model.clone(axis_name=None).apply)
            ),
            in_shardings=run.data_sharding,
            out_shardings=(run.replicated, run.replicated),
        )
        compiled = plain.lower(run.global_batch(batch)).compile()
        out[f"{impl}/partitioner"] = {"ops": parallel.collective_ops(compiled)}
    config.model.bn_group_size = 32  # 8 images per device: a group would span 4 devices
    try:
        steps.build_run(config)
    except ValueError as e:
        out["span_error"] = str(e)
    return out


def _summary(ops, batch=64):
    counts = collections.Counter(op for op, _ in ops)
    gathered = sum(op == "all-gather" and any(list(s[:1]) == [batch] for s in shapes)
                   for op, shapes in ops)  # fmt: skip
    text = ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "none"
    return text + (f" ({gathered} of the whole batch)" if gathered else "")


@pytest.fixture(scope="module")
def compiled_steps():
    impls = ["xla", "xla_auto"] + (["onednn"] if onednn.available() else [])
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=ROOT)  # fmt: skip
    done = subprocess.run([sys.executable, __file__, *impls], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_collective_reader_sees_the_partitioners_all_gathers(compiled_steps):
    ops = compiled_steps["xla/partitioner"]["ops"]
    assert "all-gather" in _summary(ops) and "of the whole batch" in _summary(ops)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "xla_auto", "onednn"])
def test_compiled_step_moves_no_activations_and_splits_the_work(compiled_steps, impl):
    """On 8 devices the step all-reduces the gradients, BN statistics and metrics, nothing
    else, and each device does 1/8 of the one-device step's arithmetic; on one device it
    moves nothing."""
    if f"{impl}/1" not in compiled_steps:
        pytest.skip(f"{impl}: {onednn.unavailable_reason()}")
    one, eight = compiled_steps[f"{impl}/1"], compiled_steps[f"{impl}/{DEVICES}"]
    assert one["ops"] == []
    opcodes = {op for op, _ in eight["ops"]}
    assert opcodes == {"all-reduce"}, opcodes
    reduced = sum(int(np.prod(shape)) for _, shapes in eight["ops"] for shape in shapes)
    # Gradients and BN running statistics (the state's size, counted twice at most for the
    # statistics) and a few scalar metrics: nothing of the size of a batch of activations.
    assert reduced <= 2 * eight["state_size"] + 16
    assert not [s for _, shapes in eight["ops"] for s in shapes if len(s) == 4 and s[0] in (8, 64)]
    assert eight["flops"] == pytest.approx(one["flops"] / DEVICES, rel=0.05)


@pytest.mark.slow
def test_bn_groups_that_would_span_devices_are_refused(compiled_steps):
    assert "a BN group never spans devices" in compiled_steps.get("span_error", "")


def test_a_bucket_url_as_workdir_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="mount it with gcsfuse"):
        loop.train_and_evaluate(_compiled_step_config("xla"), "gs://bucket/run")
    assert not list(tmp_path.iterdir())  # no local folder named gs:


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


@pytest.mark.parametrize(
    "args, environ, expected",
    [
        (("10.0.0.1:1234", 2, 1), {}, ("10.0.0.1:1234", 2, 1)),
        (
            (),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
            ("h:1", 4, 3),
        ),  # fmt: skip
        (("h:2",), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ("h:2", 2, 0)),
        ((), {}, ()),  # cluster detection
    ],
)
def test_initialize_takes_flags_then_environment_then_detection(
    args, environ, expected, monkeypatch
):
    recorder = _Recorder()
    monkeypatch.setattr(jax.distributed, "initialize", recorder)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    parallel.initialize(*args, environ=environ)
    assert recorder.calls == [expected]


@pytest.mark.parametrize(
    "args, environ, match",
    [
        (("h:1",), {}, "without a process count, process id"),
        ((), {"JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID='x' is not an integer"),
        (("h:1", 2, 2), {}, "process id 2 is not below the process count 2"),
    ],
)
def test_initialize_says_what_is_missing(args, environ, match, monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", _Recorder())
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    with pytest.raises(ValueError, match=match):
        parallel.initialize(*args, environ=environ)


def test_initialize_without_a_cluster_says_how_to_start(monkeypatch):
    def detect_nothing(*args):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", detect_nothing)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    with pytest.raises(ValueError, match="--coordinator_address=HOST:PORT"):
        parallel.initialize(environ={})


# Two processes on loopback against one, through scripts/train.py as README documents it.


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def _overrides(fashion_dir, epochs):
    """A tiny Fashion-MNIST run: the config fields the tests set beside the README's flags."""
    return [
        f"--config.dataset.data_dir={fashion_dir}",
        "--config.dataset.augment=pad_crop_flip",  # augmentation on: drawn per global row
        "--config.model.planes=8",
        "--config.model.stem_width=8",
        "--config.model.bn_group_size=8",
        "--config.batch_size=32",
        "--config.eval_batch_size=16",  # 24 test images: the last eval batch is padded
        f"--config.num_epochs={epochs}",
        "--config.eval_every_epochs=1000",
        "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=1000",
    ]


def readme_two_processes() -> list[list[str]]:
    """The README's commands for two processes on one machine, as argument lists."""
    text = (pathlib.Path(ROOT) / "README.md").read_text()
    block = text.split("**Two processes on one machine**")[1].split("```bash\n")[1]
    lines = block.split("```")[0].replace("\\\n", " ").strip().splitlines()
    return [shlex.split(line.removesuffix("&").strip()) for line in lines]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               RESNEXT_JAX_TCMALLOC="0")  # fmt: skip
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)  # fmt: skip


def _two_processes(workdir, overrides):
    """The README's two commands, with this test's work directory, a free port, `overrides`."""
    port, procs = _free_port(), []
    for python, *args in readme_two_processes():
        assert python == "python"
        args = [re.sub(r"^--workdir=.*", f"--workdir={workdir}", a) for a in args]
        args = [re.sub(r"127.0.0.1:\d+$", f"127.0.0.1:{port}", a) for a in args]
        procs.append(_start([*args, *overrides]))
    return procs


def _finish(procs, timeout=600):
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def test_the_readme_starts_processes_0_and_1_of_2():
    commands = readme_two_processes()
    assert [c[-1] for c in commands] == ["--process_id=0", "--process_id=1"]
    assert all("--distributed" in c and "--num_processes=2" in c for c in commands)


def _final(workdir):
    results = json.loads((workdir / logs.RESULTS_FILE).read_text())
    config = train_config(results["config"])
    _, variables = loop.load_for_eval(config, workdir=workdir)
    return results, jax.tree.map(np.asarray, variables)


def train_config(saved):
    import ml_collections

    config = ml_collections.ConfigDict(saved)
    config.model.stage_sizes = tuple(config.model.stage_sizes)
    config.lr_drop_epochs = tuple(config.lr_drop_epochs)
    for key in ("crop_area_range", "crop_aspect_range", "mean", "std"):
        config.dataset[key] = tuple(config.dataset[key])
    return config


EPOCHS = 40  # 80 steps: long enough for a signal to land mid-run


@pytest.fixture(scope="module")
def one_process(fashion_dir, tmp_path_factory):
    """The reference: one process with 2 (simulated) devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    args = ["scripts/train.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}"]
    _finish([_start([*args, *_overrides(fashion_dir, EPOCHS)], devices=2)])
    return _final(workdir)


def _assert_same_run(a, b):
    (results_a, variables_a), (results_b, variables_b) = a, b
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5),
                 variables_a, variables_b)  # fmt: skip
    for key in ("eval_examples", "top1_error", "top5_error", "steps"):
        assert results_a[key] == results_b[key], key
    assert results_a["eval_examples"] == 24


@pytest.mark.slow
def test_two_processes_compute_what_one_does(fashion_dir, one_process, tmp_path):
    outs = _finish(_two_processes(tmp_path, _overrides(fashion_dir, EPOCHS)))
    results, variables = _final(tmp_path)
    assert results["processes"] == 2 and results["devices"] == 2
    _assert_same_run(one_process, (results, variables))
    # One process writes the run's files: each logged step once, one event file.
    steps = [r["step"] for r in logs.read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == results["steps"]
    assert len(list((tmp_path / "tensorboard").rglob("events.*"))) == 1
    assert "step 2/" in outs[0] and "step 2/" not in outs[1]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(fashion_dir, one_process, tmp_path):
    overrides = _overrides(fashion_dir, EPOCHS)
    procs = _two_processes(tmp_path, overrides)
    for line in procs[0].stdout:  # wait until training runs
        if line.startswith("step "):
            break
    procs[1].send_signal(signal.SIGTERM)  # the process that prints nothing
    out = _finish(procs)[0]
    assert "preempted: saved step" in out, out
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert saved < 2 * EPOCHS
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [str(saved)], kept  # committed: no temporary folder left beside it
    assert not (tmp_path / logs.RESULTS_FILE).exists()
    out = _finish(_two_processes(tmp_path, overrides))[0]
    assert f"resuming from the checkpoint of step {saved}" in out
    _assert_same_run(one_process, _final(tmp_path))


def test_in_memory_eval_is_split_by_rows_over_processes(monkeypatch):
    """Each process evaluates its rows; together, every example once."""
    source = in_memory.synthetic(4, 1, 5, 16, 23)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        for batch in source.eval_batches(8):
            seen.extend(batch["label"][batch["mask"]].tolist())
    assert sorted(seen) == sorted(source.eval_labels.tolist())


if __name__ == "__main__":  # [--model=NAME] IMPL...: JSON on stdout, a table on stderr
    model = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--model=")), None)
    found = inspect_compiled_steps([a for a in sys.argv[1:] if not a.startswith("--")],
                                   model or "_tiny_resnext")  # fmt: skip
    print("| model | impl | plain jit, 8 devices | per-device step, 8 devices |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for key in (k for k in found if k.endswith("/partitioner")):
        impl = key.split("/")[0]
        print(f"| {model or '_tiny_resnext'} | {impl} | {_summary(found[key]['ops'])} | "
              f"{_summary(found[f'{impl}/{DEVICES}']['ops'])} |", file=sys.stderr)  # fmt: skip
    print(json.dumps(found))
