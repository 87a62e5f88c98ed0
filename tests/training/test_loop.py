"""The trainer end to end on tiny models and synthetic data."""

import gzip
import json
import os
import shutil
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
from resnext_jax.training import logs, loop, recipe, steps
from tests.fake_data import encode_image, write_fake_fashion_mnist, write_files

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
def test_a_resume_under_another_recipe_is_refused_and_a_shorter_budget_too(straight_run, tmp_path):
    straight, results = straight_run
    workdir = tmp_path / "copy"
    shutil.copytree(straight, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    changed = tiny_config(learning_rate=0.7, seed=5, **{"model.cardinality": 2})
    with pytest.raises(recipe.ConfigMismatchError) as e:
        loop.train_and_evaluate(changed, workdir)
    assert "trained under another recipe" in str(e.value)
    assert "model.cardinality: 4 in the workdir, 2 now" in str(e.value)
    with pytest.raises(recipe.ConfigMismatchError, match="past this config's last step 4"):
        loop.train_and_evaluate(tiny_config(max_steps=4), workdir)
    assert before == {p: p.read_bytes() for p in before}  # nothing was touched
    # Accepted, the change goes through and is recorded; results are the finished run's.
    accepted = tiny_config(eval_batch_size=8, seed=3)
    again = loop.train_and_evaluate(accepted, workdir, accept_config_change=True)
    assert again["top1_error"] == results["top1_error"] and again["seed"] == 3
    history = recipe.read_history(workdir)
    assert [(h["step"], h["accepted"]) for h in history] == [(8, ["seed"])]
    assert history[0]["changes"] == {"eval_batch_size": [16, 8], "seed": [0, 3]}
    # Without its config.json, a different model is still named as one, not as damage.
    (workdir / logs.CONFIG_FILE).unlink()
    with pytest.raises(
        recipe.ConfigMismatchError, match=r"holds another model .*The checkpoint is"
    ):
        loop.train_and_evaluate(tiny_config(**{"model.cardinality": 2}), workdir)
    assert (workdir / "checkpoints" / "8").is_dir()


@pytest.mark.slow
def test_sigterm_during_an_evaluation_keeps_that_step(straight_run, tmp_path, monkeypatch):
    """The step is saved before its evaluation; a resumed run evaluates it, and ends as an
    uninterrupted run does."""
    real_evaluate = steps.evaluate

    def preempted_evaluate(run, variables, stop=None):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the evaluation runs
        return real_evaluate(run, variables, stop=stop)

    monkeypatch.setattr(steps, "evaluate", preempted_evaluate)
    stopped = loop.train_and_evaluate(tiny_config(), tmp_path)
    assert stopped == {"status": "preempted", "step": 4}  # the first evaluation step
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert [r["split"] for r in logs.read_metrics(tmp_path)] == ["train", "train"]
    monkeypatch.setattr(steps, "evaluate", real_evaluate)
    results = loop.train_and_evaluate(tiny_config(), tmp_path)
    straight, expected = straight_run
    assert results["top1_error"] == expected["top1_error"]
    assert results["best_top1_error"] == expected["best_top1_error"]
    rows = [(r["split"], r["step"]) for r in logs.read_metrics(tmp_path)]
    assert rows == [(r["split"], r["step"]) for r in logs.read_metrics(straight)]


@pytest.mark.slow
def test_bad_images_stop_the_run_or_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 9), ("val", 4)):
        for label in ("a", "b"):
            write_files(tmp_path / "data" / split / label, {
                f"{i}.png": encode_image(rng.integers(0, 256, (12, 12, 3), np.uint8), "PNG")
                for i in range(per_class)})  # fmt: skip
        (tmp_path / "data" / split / "b" / "9_broken.jpg").write_bytes(b"\xff\xd8 cut short")
    data = {"dataset.name": "image_folder", "dataset.data_dir": str(tmp_path / "data"),
            "dataset.train_split": "train", "dataset.eval_split": "val", "model.num_classes": 2,
            "dataset.image_size": 8, "dataset.num_train_examples": 0,
            "dataset.num_eval_examples": 0, "batch_size": 8, "eval_batch_size": 8}  # fmt: skip
    with pytest.raises(base.DataError, match=r"9_broken.jpg.*--config.dataset.bad_examples=skip"):
        loop.train_and_evaluate(tiny_config(**data), tmp_path / "error")
    results = loop.train_and_evaluate(
        tiny_config(**data, **{"dataset.bad_examples": "skip"}), tmp_path / "skip"
    )
    # The broken file is train example 18 of 19 (b/9_broken.jpg sorts last): each time the
    # epoch order puts it in a batch, the next good example (0) stands in for it.
    expected = sum(int(18 in base.batch_ids(0, s, 19, 8)) for s in range(results["steps"]))
    assert results["skipped_train_examples"] == expected > 0
    assert results["skipped_eval_examples"] == 1 and results["eval_examples"] == 8
    rows = logs.read_metrics(tmp_path / "skip")
    assert [r["skipped"] for r in rows if r["split"] == "eval"] == [1, 1]
    assert rows[-2]["skipped_examples"] == expected  # the last train row


def test_a_best_error_of_zero_is_kept(monkeypatch):
    monkeypatch.setattr(steps, "evaluate", lambda run, variables, stop=None: {
        "loss": 0.1, "top1_error": 5.0, "top5_error": 0.0, "examples": 8})  # fmt: skip

    class State:
        params = batch_stats = ema = None

    meta = {**loop.new_meta(), "best_top1_error": 0.0}
    report = logs.Reporter(".", 8, 4, 8, enabled=False)
    assert loop._evaluate(None, State(), meta, 4, report)["best_top1_error"] == 0.0
    meta = loop.new_meta()
    assert loop._evaluate(None, State(), meta, 4, report)["best_top1_error"] == 5.0


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
        # 8 images per device: BN groups of 8 never span devices. XLA's layers on both: `auto`
        # gives oneDNN batch norm and dense convs to a device batch of one group (8 devices)
        # but not to eight groups (1 device), which differs in rounding, not in the math.
        done = _script("scripts/train.py", *SYNTHETIC_FLAGS, f"--workdir={workdir}",
                       "--config.max_steps=3", "--config.batch_size=64",
                       "--config.model.conv_impl=xla_auto", env=env)  # fmt: skip
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
    resumed = _script(*args, f"--config.max_steps={saved + 2}")  # a free change
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
