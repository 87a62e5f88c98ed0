"""The trainer end to end on tiny models and synthetic data."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.data import base, in_memory
from resnext_jax.devices import runtime
from resnext_jax.experiments import config_files
from resnext_jax.models import variants
from resnext_jax.training import logs, loop, steps
from tests.fake_data import write_fake_fashion_mnist

default = config_files.config_module("default")


def tiny_config(**overrides):
    config = default.get_config()
    config.model = variants.model_config("_tiny_resnext", bn_group_size=8)
    config.dataset.name = "synthetic"
    config.dataset.image_size = 8
    config.dataset.num_train_examples = 64
    config.dataset.num_eval_examples = 20  # not a multiple of the eval batch: padding is masked
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_epochs = 2
    config.lr_drop_epochs = (1,)
    config.learning_rate = 0.05
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    config.lock()
    return config


def final_params(workdir, config):
    run, variables = loop.load_for_eval(config, workdir=workdir)
    return jax.tree.map(np.asarray, variables)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs of a tiny ResNeXt on synthetic data, uninterrupted: (workdir, results)."""
    workdir = tmp_path_factory.mktemp("straight")
    start = time.time()
    results = loop.train_and_evaluate(tiny_config(), workdir)
    assert 0 < results["wall_time_s"] <= time.time() - start
    return workdir, results


@pytest.mark.slow
def test_train_and_evaluate_writes_everything(straight_run):
    tmp_path, results = straight_run
    config = tiny_config()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(logs.RESULTS_KEYS) <= set(saved)
    assert saved["steps"] == 8 and saved["epochs"] == 2 and saved["batch_size"] == 16
    assert saved["model"] == "resnext8_4x16d" and saved["devices"] == jax.device_count()
    assert saved["top1_error"] == results["top1_error"] and saved["eval_examples"] == 20
    assert saved["best_top1_error"] <= saved["top1_error"]
    rows = logs.read_metrics(tmp_path)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in eval_rows] == [4, 8]  # every epoch
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert {"loss", "lr", "top1_error", "top5_error", "images_per_sec"} <= set(train_rows[0])
    # Step decay at epoch 1 (step 4): lr 0.05 * 16 / 256 before, a tenth after.
    assert train_rows[0]["lr"] == pytest.approx(0.05 * 16 / 256)
    assert train_rows[-1]["lr"] == pytest.approx(0.05 * 16 / 256 / 10)
    assert list((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16
    # Rerunning a finished run resumes at its end and changes nothing.
    again = loop.train_and_evaluate(config, tmp_path)
    assert again["top1_error"] == results["top1_error"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(straight_run, tmp_path):
    straight, halves = straight_run[0], tmp_path / "halves"
    loop.train_and_evaluate(tiny_config(max_steps=3), halves)  # stops mid-epoch, saved at 3
    loop.train_and_evaluate(tiny_config(), halves)
    a, b = final_params(straight, tiny_config()), final_params(halves, tiny_config())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    steps = [r["step"] for r in logs.read_metrics(halves) if r["split"] == "train"]
    assert steps == [2, 3, 4, 6, 8]  # rows of the first run up to its checkpoint, then on


@pytest.mark.slow
def test_train_and_eval_steps_compile_with_the_runtime_options(tmp_path, monkeypatch):
    """Both steps pass runtime.compiler_options() (on CPU: no YNNPACK fusions) to jax.jit."""
    jitted = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        jitted.append(kwargs)
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(loop.jax, "jit", recording_jit)
    loop.train_and_evaluate(tiny_config(max_steps=1), tmp_path)
    # The train step and the eval step: the per-device programs of resnext_jax.devices.parallel.
    steps = [kw for kw in jitted if "donate_argnums" in kw]
    assert len(steps) == 2
    assert all(kw.get("compiler_options") == runtime.compiler_options() for kw in steps)
    if jax.default_backend() == "cpu":
        assert runtime.compiler_options() == runtime.NO_YNN


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(learning_rate=1e30, checkpoint_every_steps=1, log_every_steps=1)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step \d+; the last good checkpoint"):
        loop.train_and_evaluate(config, tmp_path)
    params = final_params(tmp_path, config)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    assert not (tmp_path / "results.json").exists()


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    return write_fake_fashion_mnist(tmp_path)


def test_fashion_mnist_reader(fake_fashion_mnist):
    source = in_memory.fashion_mnist(str(fake_fashion_mnist))
    assert source.image_shape == (28, 28, 1) and source.num_train == 64 and source.num_eval == 24
    batch = next(source.train_batches(16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
    (fake_fashion_mnist / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08"))
    with pytest.raises(base.DataError, match="not an IDX file"):
        in_memory.fashion_mnist(str(fake_fashion_mnist))


def test_bad_configs_and_missing_data_get_clear_errors(tmp_path, fake_fashion_mnist):
    fmnist = {"dataset.name": "fashion_mnist", "dataset.data_dir": str(fake_fashion_mnist)}
    with pytest.raises(ValueError, match="--config.model.num_classes=10"):
        bad = {"model.num_classes": 7, "model.input_channels": 1}
        loop.train_and_evaluate(tiny_config(**fmnist, **bad), tmp_path)
    with pytest.raises(ValueError, match="--config.model.input_channels=1"):
        loop.train_and_evaluate(tiny_config(**fmnist), tmp_path)
    with pytest.raises(ValueError, match="not a multiple of model.bn_group_size=8"):
        loop.train_and_evaluate(tiny_config(batch_size=jax.device_count() * 16 + 1), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tiny_config(**{"dataset.name": "fashion_mnist", "dataset.data_dir": str(empty)})
    with pytest.raises(base.DataError, match="apt-get install dataset-fashion-mnist"):
        loop.train_and_evaluate(missing, tmp_path)
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        loop.train_and_evaluate(tiny_config(lr_schedule="linear"), tmp_path)


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
    loop.train_and_evaluate(tiny_config(max_steps=2), tmp_path)
    step_dir = tmp_path / "checkpoints" / "2"
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="Move that step's folder aside"):
        loop.train_and_evaluate(tiny_config(), tmp_path)
    assert step_dir.exists()


def _script(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)  # fmt: skip


SYNTHETIC_FLAGS = [
    "--config=configs/fashion_mnist.py",
    "--config.dataset.name=synthetic",
    "--config.model.num_classes=10",
    "--config.model.input_channels=3",
    "--config.dataset.image_size=8",
    "--config.dataset.num_train_examples=256",
    "--config.dataset.num_eval_examples=32",
    "--config.model.planes=8",
    "--config.model.stem_width=8",
    "--config.model.bn_group_size=8",
    "--config.batch_size=32",
    "--config.eval_batch_size=32",
    "--config.num_epochs=2",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=4",
]


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
    """The same config on 1 and 8 (simulated) devices gives the same parameters."""
    outs = {}
    for devices in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        workdir = tmp_path / str(devices)
        # 8 images per device: BN groups of 8 never span devices.
        done = _script("scripts/train.py", *SYNTHETIC_FLAGS, f"--workdir={workdir}",
                       "--config.max_steps=3", "--config.batch_size=64", env=env)  # fmt: skip
        out, _ = done.communicate(timeout=300)
        assert done.returncode == 0, out
        results = json.loads((workdir / "results.json").read_text())
        assert results["devices"] == devices
        outs[devices] = (results, workdir)
    a = final_params(outs[1][1], _from_results(outs[1][0]))
    b = final_params(outs[8][1], _from_results(outs[8][0]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    assert outs[1][0]["top1_error"] == outs[8][0]["top1_error"]


def _from_results(results):
    import ml_collections

    config = ml_collections.ConfigDict(results["config"])
    config.model.stage_sizes = tuple(config.model.stage_sizes)
    config.lr_drop_epochs = tuple(config.lr_drop_epochs)
    return config


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    args = ["scripts/train.py", *SYNTHETIC_FLAGS, f"--workdir={tmp_path}",
            "--config.checkpoint_every_steps=1000", "--config.num_epochs=50"]  # fmt: skip
    proc = _script(*args)
    for line in proc.stdout:  # wait until training runs
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted: saved step" in out
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / str(saved)).is_dir()
    assert not (tmp_path / "results.json").exists()
    resumed = _script(*args[:-1], "--config.num_epochs=2", f"--config.max_steps={saved + 2}")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming from the checkpoint of step {saved}" in out


@pytest.mark.slow
def test_eval_script_matches_results(tmp_path):
    config_flags = [*SYNTHETIC_FLAGS, "--config.max_steps=2"]
    done = _script("scripts/train.py", *config_flags, f"--workdir={tmp_path}")
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    done = _script("scripts/eval.py", *config_flags, f"--workdir={tmp_path}",
                   f"--output={tmp_path / 'eval.json'}")  # fmt: skip
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())
    assert evaluated["top1_error"] == pytest.approx(results["top1_error"])
    assert evaluated["examples"] == 32


@pytest.mark.slow
def test_readme_main_command_shortened(tmp_path):
    done = _script("scripts/train.py", "--config=configs/fashion_mnist.py",
                   f"--workdir={tmp_path}", "--config.max_steps=3",
                   "--config.dataset.num_eval_examples=500")  # fmt: skip
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "fashion_mnist" and results["eval_examples"] == 500


@pytest.mark.slow
def test_init_from_a_variables_checkpoint_replaces_the_head(tmp_path):
    from resnext_jax.training import checkpoint

    pretrained_cfg = variants.model_config("_tiny_resnext", bn_group_size=8, num_classes=5)
    model = variants.build_model(pretrained_cfg)
    variables = model.init(jax.random.key(7), np.zeros((1, 8, 8, 3), np.float32))
    checkpoint.save_variables(tmp_path / "pretrained", variables, pretrained_cfg)
    # lr 0: the one step leaves the parameters as they were loaded.
    config = tiny_config(init_from=str(tmp_path / "pretrained"), max_steps=1, learning_rate=0.0)
    loop.train_and_evaluate(config, tmp_path / "run")
    loaded = final_params(tmp_path / "run", config)
    assert loaded["params"]["head"]["kernel"].shape[-1] == 10
    for name in ("stem_conv", "stage2_block0"):
        jax.tree.map(np.testing.assert_array_equal, loaded["params"][name],
                     jax.tree.map(np.asarray, variables["params"][name]))  # fmt: skip
    wrong = variants.model_config("_tiny_resnext", cardinality=2, base_width=32)
    checkpoint.save_variables(tmp_path / "other", variables, wrong)
    with pytest.raises(ValueError, match="holds a different model"):
        loop.train_and_evaluate(tiny_config(init_from=str(tmp_path / "other")), tmp_path / "r2")


def test_topk_below_k_classes_counts_every_label():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    labels = jnp.array([2, 0])
    assert steps.topk_correct(logits, labels, 5).tolist() == [True, True]
    assert steps.topk_correct(logits, labels, 1).tolist() == [False, True]
