"""The optimizer chain and the learning-rate schedule, on trees small enough to check by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.experiments import config_files
from resnext_jax.training import optim

default = config_files.config_module("default")


def _config(**overrides):
    config = default.get_config()
    config.update(overrides)
    return config


def test_linear_scaling_and_step_schedule():
    config = _config(batch_size=64, num_epochs=4, lr_drop_epochs=(2, 3), warmup_epochs=0.0)
    assert optim.scaled_learning_rate(config) == pytest.approx(0.1 * 64 / 256)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    lrs = [float(schedule(s)) for s in (0, 19, 20, 29, 30, 39)]
    np.testing.assert_allclose(lrs, [0.025, 0.025, 0.0025, 0.0025, 0.00025, 0.00025], rtol=1e-6)


def test_warmup_then_cosine():
    config = _config(batch_size=256, num_epochs=10, lr_schedule="cosine", warmup_epochs=2.0)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.05)
    assert float(schedule(20)) == pytest.approx(0.1)
    assert float(schedule(60)) == pytest.approx(0.05)  # half way through the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_weight_decay_momentum_and_nesterov_on_two_leaves(decay_on):
    config = _config(batch_size=256, weight_decay=0.5, weight_decay_on=decay_on, nesterov=False,
                     momentum=0.9)  # fmt: skip
    tx = optim.create_optimizer(config, steps_per_epoch=100)
    params = {"conv": {"kernel": jnp.array([2.0])}, "bn": {"bias": jnp.array([4.0])}}
    grads = {"conv": {"kernel": jnp.array([1.0])}, "bn": {"bias": jnp.array([1.0])}}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    # Torch's SGD: d = g + wd * p; buf = d; p -= lr * buf.
    bias_decay = 0.5 * 4.0 if decay_on == "all" else 0.0
    np.testing.assert_allclose(updates["conv"]["kernel"], [-0.1 * (1 + 0.5 * 2.0)])
    np.testing.assert_allclose(updates["bn"]["bias"], [-0.1 * (1 + bias_decay)])
    updates, _ = tx.update(grads, state, params)  # second step: buf = 0.9 * buf + d
    np.testing.assert_allclose(updates["conv"]["kernel"], [-0.1 * 1.9 * 2.0], rtol=1e-6)


def test_gradient_clipping_and_bad_choices():
    config = _config(grad_clip_norm=1.0, weight_decay=0.0, momentum=0.0)
    tx = optim.create_optimizer(config, steps_per_epoch=1)
    params = {"a": jnp.zeros(2)}
    updates, _ = tx.update({"a": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.1 * 0.6, -0.1 * 0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="choose"):
        optim.create_optimizer(_config(weight_decay_on="bn"), 1)


def test_cosine_decays_to_its_floor():
    config = _config(batch_size=256, num_epochs=10, lr_schedule="cosine", lr_min=0.01)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(50)) == pytest.approx(0.01 + 0.09 / 2)
    assert float(schedule(100)) == pytest.approx(0.01)


def _two_leaves():
    params = {"conv": {"kernel": jnp.array([3.0, 4.0])}, "bn": {"bias": jnp.array([2.0])}}
    grads = {"conv": {"kernel": jnp.array([0.5, -1.0])}, "bn": {"bias": jnp.array([0.25])}}
    return params, grads


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_adamw_decays_decoupled_from_the_gradient(decay_on):
    config = _config(optimizer="adamw", batch_size=256, learning_rate=0.1, weight_decay=0.5,
                     weight_decay_on=decay_on, adam_betas=(0.9, 0.99), adam_eps=1e-8)  # fmt: skip
    tx = optim.create_optimizer(config, steps_per_epoch=100)
    params, grads = _two_leaves()
    updates, _ = tx.update(grads, tx.init(params), params)
    # First step: Adam's bias-corrected m / sqrt(v) is sign(g); then p -= lr * wd * p.
    np.testing.assert_allclose(updates["conv"]["kernel"],
                               -0.1 * (np.sign([0.5, -1.0]) + 0.5 * np.array([3.0, 4.0])),
                               rtol=1e-6)  # fmt: skip
    bias_decay = 0.5 * 2.0 if decay_on == "all" else 0.0
    np.testing.assert_allclose(updates["bn"]["bias"], [-0.1 * (1 + bias_decay)], rtol=1e-6)


def test_lamb_scales_each_decayed_tensor_by_its_trust_ratio():
    config = _config(optimizer="lamb", batch_size=256, learning_rate=0.1, weight_decay=0.5,
                     weight_decay_on="kernels", adam_eps=1e-8)  # fmt: skip
    tx = optim.create_optimizer(config, steps_per_epoch=100)
    params, grads = _two_leaves()
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = np.array([3.0, 4.0])
    direction = np.sign([0.5, -1.0]) + 0.5 * kernel  # Adam's step plus the decay
    ratio = np.linalg.norm(kernel) / np.linalg.norm(direction)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * ratio * direction, rtol=1e-5)
    # No decay and, as in timm's Lamb, no trust ratio for a bias: Adam's step alone.
    np.testing.assert_allclose(updates["bn"]["bias"], [-0.1], rtol=1e-4)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="choose one of .*lamb"):
        optim.create_optimizer(_config(optimizer="adam"), steps_per_epoch=1)
