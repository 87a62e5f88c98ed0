import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="session")
def tiny_batch():
    return jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


def init(model, x):
    return model.init(jax.random.key(0), jnp.zeros_like(x))


def slow_unless(values, fast):
    """Parameters for `pytest.mark.parametrize`: those not in `fast` only in the full suite.

    A tuple is one set of several arguments, as `parametrize` takes them.
    """
    slow = pytest.mark.slow
    return [
        v if v in fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=slow)
        for v in values
    ]
