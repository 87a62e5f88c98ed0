import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="session")
def tiny_batch():
    return jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


def init(model, x):
    return model.init(jax.random.key(0), jnp.zeros_like(x))
