"""The modern-recipe tools of the training step: the losses, EMA, and every tool together,
on one device and on eight (configs/default.py lists them; README "Modern recipes")."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax.training import logs, loop, recipe, steps
from tests.training.test_loop import (
    SYNTHETIC_FLAGS,
    _from_results,
    _script,
    final_params,
    tiny_config,
)

# Every tool of the training step at once (the data-pipeline ones: tests/data).
ALL_TOOLS = {
    "optimizer": "lamb", "learning_rate": 0.005, "weight_decay": 0.01,
    "weight_decay_on": "kernels", "warmup_epochs": 0.5, "lr_schedule": "cosine",
    "lr_min": 1e-4, "loss": "bce", "bce_target_threshold": 0.2, "label_smoothing": 0.1,
    "mixup_alpha": 0.1, "cutmix_alpha": 1.0, "mix_prob": 1.0, "mix_switch_prob": 0.5,
    "ema_decay": 0.9, "model.drop_path_rate": 0.2,
}  # fmt: skip


def test_bce_averages_over_classes_and_thresholds_its_targets():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    targets = jnp.array([[0.7, 0.25, 0.05], [0.1, 0.15, 0.75]])
    sigmoid = jax.nn.sigmoid(logits)

    def by_hand(t):
        return -jnp.mean(t * jnp.log(sigmoid) + (1 - t) * jnp.log(1 - sigmoid), axis=-1)

    options = steps.StepOptions(loss="bce")
    np.testing.assert_allclose(steps.loss_per_example(logits, targets, options), by_hand(targets),
                               rtol=1e-6)  # fmt: skip
    options = steps.StepOptions(loss="bce", bce_target_threshold=0.2)
    hard = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(steps.loss_per_example(logits, targets, options), by_hand(hard),
                               rtol=1e-6)  # fmt: skip
    softmax = steps.loss_per_example(logits, targets, steps.StepOptions())
    np.testing.assert_allclose(softmax, optax.softmax_cross_entropy(logits, targets))


def test_step_options_come_from_the_config_and_bad_values_are_named():
    config = tiny_config(**ALL_TOOLS)
    options = steps.StepOptions.from_config(config)
    assert (options.loss, options.mixup_alpha, options.ema_decay) == ("bce", 0.1, 0.9)
    assert options.mixes and not steps.StepOptions().mixes
    with pytest.raises(ValueError, match=r"loss='focal' \(must be one of"):
        recipe.validate(tiny_config(loss="focal"))
    with pytest.raises(ValueError, match=r"mix_prob=2.0 .*ema_decay=1.0"):
        recipe.validate(tiny_config(ema_decay=1.0, mix_prob=2))


def test_ema_moves_toward_the_new_weights():
    ema = {"params": {"w": jnp.array([1.0])}, "batch_stats": {"m": jnp.array([0.0])}}
    state = steps.TrainState(step=0, apply_fn=None, params={"w": jnp.array([3.0])}, tx=None,
                             opt_state=None, batch_stats={"m": jnp.array([2.0])})  # fmt: skip
    new = steps.update_ema(ema, state, 0.75)
    np.testing.assert_allclose(new["params"]["w"], [1.5])
    np.testing.assert_allclose(new["batch_stats"]["m"], [0.5])


@pytest.mark.slow
def test_ema_is_evaluated_beside_the_weights_saved_and_resumed_exactly(tmp_path):
    config = tiny_config(ema_decay=0.8)
    straight = tmp_path / "straight"
    results = loop.train_and_evaluate(config, straight)
    assert {"ema_top1_error", "ema_top5_error", "ema_eval_loss"} <= set(results)
    saved = json.loads((straight / logs.RESULTS_FILE).read_text())
    assert saved["ema_top1_error"] == results["ema_top1_error"]
    evals = [r for r in logs.read_metrics(straight) if r["split"] == "eval"]
    assert evals and all("ema_top1_error" in r and "ema_loss" in r for r in evals)

    halves = tmp_path / "halves"
    loop.train_and_evaluate(tiny_config(ema_decay=0.8, max_steps=3), halves)
    loop.train_and_evaluate(config, halves)
    a, b = (loop.load_for_eval(config, w, ema=True)[1] for w in (straight, halves))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.slow
def test_every_tool_together_trains_and_changes_the_weights(tmp_path):
    config = tiny_config(**ALL_TOOLS)
    results = loop.train_and_evaluate(config, tmp_path)
    assert np.isfinite(results["top1_error"]) and np.isfinite(results["ema_top1_error"])
    rows = [r for r in logs.read_metrics(tmp_path) if r["split"] == "train"]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_mixing_and_drop_path_are_the_same_on_eight_devices_as_on_one(tmp_path):
    """The draws cover the global batch, so a run on 8 devices equals one on 1 device."""
    outs = {}
    flags = ["--config.mixup_alpha=0.2", "--config.cutmix_alpha=1.0",
             "--config.model.drop_path_rate=0.3", "--config.ema_decay=0.5"]  # fmt: skip
    for devices in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        workdir = tmp_path / str(devices)
        done = _script("scripts/train.py", *SYNTHETIC_FLAGS, *flags, f"--workdir={workdir}",
                       "--config.max_steps=3", "--config.batch_size=64",
                       "--config.model.conv_impl=xla_auto", env=env)  # fmt: skip
        out, _ = done.communicate(timeout=300)
        assert done.returncode == 0, out
        outs[devices] = (json.loads((workdir / "results.json").read_text()), workdir)
    a = final_params(outs[1][1], _from_results(outs[1][0]))
    b = final_params(outs[8][1], _from_results(outs[8][0]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    assert outs[1][0]["ema_top1_error"] == outs[8][0]["ema_top1_error"]
