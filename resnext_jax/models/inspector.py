"""The one walker over a model's layers, and what is computed from it with no compute.

`layers(model, input_shape)` traces `model.init` under `jax.eval_shape` and records every
call of a Conv, BatchNorm or Dense module in order, with its input and output shapes. From
it come the parameter count, the multiply-adds as the paper counts them, the conv
implementations a model runs (`auto` resolved) and, in resnext_jax/models/interop.py, the
order of torchvision's state_dict. `xla_flops` reads XLA's own count from a compiled forward.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.models.resnet import BatchNorm
from resnext_jax.ops import conv as conv_ops
from resnext_jax.ops.conv import Conv

LAYER_TYPES = (Conv, BatchNorm, nn.Dense)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One call of a Conv, BatchNorm or Dense module during `init`."""

    path: tuple[str, ...]  # the module's scope, e.g. ("stage1_block0", "conv2")
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def variable_shapes(model, input_shape) -> dict:
    """The model's variables as ShapeDtypeStructs (no compute, no memory)."""
    return layers(model, input_shape)[1]


def layers(model, input_shape) -> tuple[list[Layer], dict]:
    """(every layer call in order, the variables' shapes) from tracing `model.init`."""
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, LAYER_TYPES):
            # A batch norm's input has its output's shape (one given `conv` gets the conv's).
            x = out if isinstance(module, BatchNorm) else args[0]
            calls.append(Layer(module.path, module, tuple(x.shape), tuple(out.shape)))
        return out

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    return calls, shapes


def param_count(model, input_shape) -> int:
    """Number of trainable parameters (no BN running statistics), with no compute."""
    params = variable_shapes(model, input_shape)["params"]
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _kernel_taps(size_in, size_out, kernel, stride, pad, valid_only):
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
    for layer in layers(model, (1, *input_shape[1:]))[0]:
        module, x, y = layer.module, layer.in_shape, layer.out_shape
        if isinstance(module, Conv):
            k, s = module.kernel_size, module.strides
            taps = _kernel_taps(x[1], y[1], k, s, k // 2, valid_only) * _kernel_taps(
                x[2], y[2], k, s, k // 2, valid_only
            )
            total += taps * (x[-1] // module.groups) * module.features
        elif isinstance(module, nn.Dense):
            total += x[-1] * module.features
    return int(total)


def conv_impls(model, input_shape) -> list[str]:
    """The conv implementations the model's convs run (`auto` resolved; resnext_jax.ops.conv)."""
    used = set()
    for layer in layers(model, input_shape)[0]:
        module = layer.module
        if isinstance(module, Conv):
            impl = (
                module.impl
                if module.groups > 1
                else module.dense or conv_ops.dense_impl(module.impl)
            )
            k = module.kernel_size
            kernel = (k, k, layer.in_shape[-1] // module.groups, module.features)
            used.add(conv_ops.resolve_impl(impl, layer.in_shape, kernel, module.strides,
                                           module.groups))  # fmt: skip
    return sorted(used)


def xla_flops(model, input_shape) -> float:
    """FLOPs of one eval-mode forward pass per image, from XLA's compiled cost analysis."""
    if hasattr(model, "conv_impl"):  # XLA's own convs: it counts none inside custom calls
        model = model.clone(conv_impl="xla")
    variables = variable_shapes(model, input_shape)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / input_shape[0]
