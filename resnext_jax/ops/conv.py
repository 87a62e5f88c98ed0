"""The one convolution layer every block uses, and the choice of how each conv runs.

Every implementation reads the same parameter: the `(kh, kw, in/groups, out)` kernel that
`flax.linen.Conv(feature_group_count=groups)` stores, so a checkpoint never depends on
which implementation trained it. The implementations (`IMPLS`, chosen by a model's
`conv_impl`) are XLA's native grouped conv and its rewrites (resnext_jax/ops/xla_convs.py)
and oneDNN's kernels as XLA custom calls (resnext_jax/ops/onednn.py):

    onednn     oneDNN's JIT conv kernels, the library PyTorch's CPU convs use
    xla        XLA's own `feature_group_count` conv
    dense      one dense conv with the block-diagonal kernel (never picked by `auto`)
    shift      kh*kw*in/groups fused multiply-adds of shifted inputs (narrow groups)
    matmul     im2col, then a matmul batched over groups (never picked by `auto`)
    xla_wgrad  the native conv with a faster kernel gradient (wide groups)

`auto` picks per backend and shape (`select_impl`); `xla_auto` picks the same way among the
XLA formulations only (what `auto` does where oneDNN cannot run). Dense convs are not
grouped-conv choices: on CPU they run through oneDNN too where it is built, and otherwise
(and under `xla` and `xla_auto`) a dense 1x1 conv runs as `pointwise` (one matmul over
positions), any other as `xla`. `KERNELS` holds every name `select_impl` returns.
docs/benchmarks.md ("CPU training beside torchvision", "Grouped convolution through oneDNN",
"Grouped convolution on XLA CPU") has the measurements behind the rules.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.ops import onednn, xla_convs

# He init with fan-out, as in the paper's code and torchvision (kaiming_normal_, mode="fan_out").
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# The grouped-conv implementations a model can be told to use (model.conv_impl).
IMPLS: dict[str, Callable] = {
    "xla": xla_convs.native,
    "dense": xla_convs.dense,
    "shift": xla_convs.shift,
    "matmul": xla_convs.matmul,
    "xla_wgrad": xla_convs.xla_wgrad,
    "onednn": onednn.grouped_conv,
}
# Every kernel `select_impl` may return: the above, and `pointwise` for dense 1x1 convs.
KERNELS: dict[str, Callable] = {**IMPLS, "pointwise": xla_convs.pointwise}


AUTO = ("auto", "xla_auto")  # the two choosers; `xla_auto` never picks `onednn`
CHOICES = (*AUTO, *IMPLS)


def onednn_usable() -> bool:
    """Whether `auto` may pick `onednn`: it is built and loaded.

    On any number of devices: the trainer's and the benchmark's steps run one program per
    device (resnext_jax/devices/parallel.py), so XLA never has to split the custom call over
    a mesh, which it cannot (under a plain `jax.jit` over a batch-sharded input it would run
    the whole batch on every device).
    """
    return onednn.available()


def onednn_on_this_backend() -> bool:
    """Whether oneDNN's kernels run here: on CPU, where the `onednn` impl is built."""
    return jax.default_backend() == "cpu" and onednn_usable()


def select_impl(x_shape, kernel_shape, strides, groups, backend=None, use_onednn=None) -> str:
    """The kernel (a key of `KERNELS`) that `auto` runs for this conv on this backend.

    Off CPU: XLA's native conv (no measurement there says otherwise). On CPU, every conv,
    dense or grouped: `onednn` wherever it can run (`use_onednn`, default `onednn_usable()`).
    Without it (`xla_auto`), dense convs: `pointwise` for 1x1, `xla` otherwise; grouped ones:
    `shift` at narrow groups (in/groups <= 8 with at most 72 taps per output), and at
    in/groups <= 16 on
    stride-1 maps of at least 56x56 with at most 128 input channels; `xla_wgrad` everywhere
    else. `dense` and `matmul` are never picked: `dense`'s zero blocks would show up in every
    FLOP count read from XLA, and `matmul` never beat `xla_wgrad` by much. The rules follow
    scripts/bench_grouped_conv.py's tables in docs/benchmarks.md.
    """
    backend = backend or jax.default_backend()
    kh, kw, group_in, _ = kernel_shape
    if backend != "cpu":
        return "xla"
    if onednn_usable() if use_onednn is None else use_onednn:
        return "onednn"
    if groups == 1:
        return "pointwise" if (kh, kw) == (1, 1) else "xla"
    taps = kh * kw * group_in  # multiply-adds per output of `shift`'s fused loop body
    if group_in <= 8 and taps <= 72:
        return "shift"
    large_map = min(x_shape[1:3]) >= 56
    narrow = x_shape[3] <= 128
    if group_in <= 16 and taps <= 144 and large_map and narrow and strides == 1:
        return "shift"
    return "xla_wgrad"


def resolve_impl(impl, x_shape, kernel_shape, strides, groups) -> str:
    """`impl` itself, or for `auto` and `xla_auto` what `select_impl` picks for this conv."""
    if impl not in AUTO:
        return impl
    use_onednn = False if impl == "xla_auto" else None
    return select_impl(x_shape, kernel_shape, strides, groups, use_onednn=use_onednn)


def conv2d(x, kernel, *, strides=1, padding=0, groups=1, impl="auto"):
    """2-D convolution of NHWC `x` with an HWIO `kernel` split into `groups` groups."""
    impl = resolve_impl(impl, x.shape, kernel.shape, strides, groups)
    if impl not in KERNELS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {list(CHOICES)}")
    return KERNELS[impl](x, kernel, strides, padding, groups)


def dense_impl(impl: str) -> str:
    """How an ungrouped conv runs under a model's `conv_impl`: XLA's formulations (`xla_auto`'s
    picks) under `xla` and `xla_auto`, `auto`'s picks under every other choice."""
    return "xla_auto" if impl in ("xla", "xla_auto") else "auto"


def uses_onednn(impl: str) -> bool:
    """Whether a model's `conv_impl` lets its other layers (batch norm) run on oneDNN too."""
    return impl not in ("xla", "xla_auto")


class Conv(nn.Module):
    """Bias-free square conv with symmetric padding k//2 (torchvision's), optionally grouped.

    `impl` chooses how a grouped conv runs; an ungrouped one takes `dense` if given, else
    `dense_impl(impl)` (`auto`'s pick unless `impl` is `xla` or `xla_auto`), so forcing an
    implementation for a model's grouped 3x3s leaves its dense convs alone.
    """

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    impl: str = "auto"
    dense: str | None = None  # an ungrouped conv's impl; None: dense_impl(impl)
    dtype: Any = jnp.float32
    kernel_init: Callable = he_fan_out

    def _kernel_shape(self, x_shape) -> tuple[int, int, int, int]:
        k = self.kernel_size
        return (k, k, x_shape[-1] // self.groups, self.features)

    def takes_affine(self, x, add=None) -> bool:
        """Whether `__call__` can apply an inference batch norm (`affine`), `add` and a ReLU in
        the conv's own oneDNN call: a conv that `auto` (or `onednn`) runs on oneDNN here, in a
        dtype oneDNN runs natively (float32, or bfloat16 on AVX-512; `x` is cast to it, as
        always, and `add` must be in it), where `onednn.conv_affine_applies`."""
        kernel_shape = self._kernel_shape(x.shape)
        impl = self.impl if self.groups > 1 else self.dense or dense_impl(self.impl)
        padding = self.kernel_size // 2
        dtype = jnp.dtype(self.dtype)
        return (
            onednn_on_this_backend()
            and dtype in onednn.native_dtypes()
            and (add is None or add.dtype == dtype)
            and resolve_impl(impl, x.shape, kernel_shape, self.strides, self.groups) == "onednn"
            and onednn.conv_affine_applies(kernel_shape, self.strides, padding, self.groups, dtype)
        )

    @nn.compact
    def __call__(self, x, affine=None, add=None, relu=False):
        """The conv of `x`; with `affine` = (mul, shift), one value an output channel, and where
        `takes_affine`, relu(conv * mul + shift + add) in one call (`add` and the ReLU
        optional)."""
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: {self.groups} groups must divide both the input width "
                f"{in_features} and the output width {self.features}"
            )
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, self._kernel_shape(x.shape))
        if affine is not None:
            if not self.takes_affine(x, add):
                raise ValueError(f"{self.name}: this conv cannot apply an affine map itself "
                                 "(Conv.takes_affine)")  # fmt: skip
            mul, shift = affine
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            return onednn.conv_affine(x, kernel, mul, shift, self.strides, k // 2, self.groups,
                                      add=add, relu=relu)  # fmt: skip
        if add is not None or relu:
            raise ValueError(f"{self.name}: `add` and `relu` come with `affine`")
        return conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            strides=self.strides,
            padding=k // 2,
            groups=self.groups,
            impl=self.impl if self.groups > 1 else self.dense or dense_impl(self.impl),
        )
