"""ReLU whose output is stored once and whose gradient reads that output.

`jax.nn.relu` keeps its input for the backward pass. After a residual add, XLA is then free to
fuse the add and the ReLU into every consumer of the block's output: the next block's residual
add, and the ReLU masks of the backward pass. Each of those then reads the add's operands
instead of the stored output, and along a stage the chain of adds reaches back through every
block: each block's last batch-norm output stays alive until the backward pass. When that
output comes from an opaque custom call (resnext_jax/ops/onednn.py), nothing else keeps it,
and ResNet-50's step held about 450 MB more (docs/benchmarks.md).

Here the output passes through an optimization barrier, so consumers read the one stored
copy (the next block keeps it anyway as its conv's input), and the gradient is masked with
it: `out > 0` exactly where `in > 0`, so this is `jax.nn.relu`'s gradient bit for bit.
"""

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def relu(x):
    return lax.optimization_barrier(jnp.maximum(x, 0))


def _relu_fwd(x):
    y = relu(x)
    return y, y


def _relu_bwd(y, dy):
    return (jnp.where(y > 0, dy, 0),)


relu.defvjp(_relu_fwd, _relu_bwd)
