"""The one convolution layer every block uses, with selectable grouped-conv implementations.

Every implementation reads the same parameter: the `(kh, kw, in/groups, out)` kernel that
`flax.linen.Conv(feature_group_count=groups)` stores, so a checkpoint never depends on
which implementation trained it.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# He init with fan-out, as in the paper's code and torchvision (kaiming_normal_, mode="fan_out").
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _xla(x, kernel, strides, padding, groups):
    """XLA's native grouped convolution (`feature_group_count`)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


IMPLS: dict[str, Callable] = {"xla": _xla}


def select_impl(x_shape, kernel_shape, strides, groups, backend=None) -> str:
    """The implementation `auto` picks for this shape on this backend."""
    del x_shape, kernel_shape, strides, groups, backend
    return "xla"


def conv2d(x, kernel, *, strides=1, padding=0, groups=1, impl="auto"):
    """2-D convolution of NHWC `x` with an HWIO `kernel` split into `groups` groups."""
    if impl == "auto":
        impl = select_impl(x.shape, kernel.shape, strides, groups)
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {['auto', *IMPLS]}")
    return IMPLS[impl](x, kernel, strides, padding, groups)


class Conv(nn.Module):
    """Bias-free square conv with symmetric padding k//2 (torchvision's), optionally grouped."""

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32
    kernel_init: Callable = he_fan_out

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: {self.groups} groups must divide both the input width "
                f"{in_features} and the output width {self.features}"
            )
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, in_features // self.groups, self.features)
        )
        return conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            strides=self.strides,
            padding=k // 2,
            groups=self.groups,
            impl=self.impl,
        )
