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
    with pytest.raises(ValueError, match="only 'sgd'"):
        optim.create_optimizer(_config(optimizer="adam"), 1)
