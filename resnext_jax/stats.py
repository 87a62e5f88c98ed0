"""Complexity figures computed from a model: parameters, multiply-adds, XLA's FLOP count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.grouped_conv import Conv


def _init_shapes(model, input_shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))


def param_count(model, input_shape) -> int:
    """Number of trainable parameters (no BN running statistics), with no compute."""
    params = _init_shapes(model, input_shape)["params"]
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _taps(size_in, size_out, kernel, stride, pad, valid_only):
    """Kernel taps summed over output positions along one axis (padding taps optional)."""
    if not valid_only:
        return size_out * kernel
    return sum(
        sum(0 <= o * stride - pad + i < size_in for i in range(kernel)) for o in range(size_out)
    )


def multiply_adds(model, input_shape, valid_only: bool = False) -> int:
    """Multiply-adds of the convs and the linear head for one image, as the paper counts them.

    The paper (and torchvision, fvcore) count every kernel tap at every output position;
    `valid_only=True` leaves out taps that fall on zero padding, which is what XLA counts.
    """
    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, Conv):
            x = args[0]
            k, s = module.kernel_size, module.strides
            taps = _taps(x.shape[1], out.shape[1], k, s, k // 2, valid_only) * _taps(
                x.shape[2], out.shape[2], k, s, k // 2, valid_only
            )
            total += taps * (x.shape[-1] // module.groups) * module.features
        elif isinstance(module, nn.Dense):
            total += args[0].shape[-1] * module.features
        return out

    with nn.intercept_methods(count):
        _init_shapes(model, (1, *input_shape[1:]))
    return int(total)


def xla_flops(model, input_shape) -> float:
    """FLOPs of one eval-mode forward pass per image, from XLA's compiled cost analysis."""
    if hasattr(model, "conv_impl"):  # XLA's own convs: it counts none inside custom calls
        model = model.clone(conv_impl="xla")
    variables = _init_shapes(model, input_shape)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / input_shape[0]
