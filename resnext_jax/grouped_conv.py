"""The one convolution layer every block uses, with selectable grouped-conv implementations.

Every implementation reads the same parameter: the `(kh, kw, in/groups, out)` kernel that
`flax.linen.Conv(feature_group_count=groups)` stores, so a checkpoint never depends on
which implementation trained it.

XLA's CPU backend runs narrow-group `feature_group_count` convs slower than the dense conv
they replace, and their kernel gradient (a `batch_group_count` conv) about 60x slower than
a dense conv's at ResNeXt-50's first stage. The alternatives, all selectable by name
(`select_impl` picks on CPU):

    onednn     oneDNN's JIT conv kernels as XLA custom calls (resnext_jax.onednn), the
               library PyTorch's CPU convs use; `auto`'s pick wherever it is built
    dense      one dense conv with the block-diagonal kernel (not picked by `auto`)
    shift      kh*kw*in/groups fused multiply-adds of shifted inputs (narrow groups)
    matmul     im2col, then a matmul batched over groups (not picked by `auto`)
    xla_wgrad  the native conv with `_weight_grad` for its kernel gradient (wide groups)

`auto` picks per backend and shape; `xla_auto` picks the same way among the XLA
formulations only (what `auto` does where oneDNN cannot run).

Dense 1x1 convs (every bottleneck has two, plus the projection shortcuts) have their own
`pointwise` path on CPU, one matmul over positions, for the same reason: XLA CPU's kernel
gradient of a 1x1 conv is a convolution with the whole feature map as its window.

docs/benchmarks.md ("Grouped convolution through oneDNN", "Grouped convolution on XLA CPU")
has the measurements behind the rules.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax import onednn, parallel

# He init with fan-out, as in the paper's code and torchvision (kaiming_normal_, mode="fan_out").
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _pads(padding):
    return ((padding, padding), (padding, padding))


def _xla(x, kernel, strides, padding, groups):
    """XLA's native grouped convolution (`feature_group_count`)."""
    return _native_conv(x, kernel, strides, _pads(padding), groups)


def _native_conv(x, kernel, strides, pads, groups):
    """`lax.conv_general_dilated` in this module's layout and argument order."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _block_diagonal(kernel, groups):
    """The dense `(kh, kw, in, out)` kernel equal to a grouped one: zeros off the diagonal."""
    kh, kw, group_in, out = kernel.shape
    blocks = kernel.reshape(kh, kw, 1, group_in, groups, out // groups)
    mask = jnp.eye(groups, dtype=kernel.dtype).reshape(1, 1, groups, 1, groups, 1)
    return (blocks * mask).reshape(kh, kw, groups * group_in, out)


def _dense(x, kernel, strides, padding, groups):
    """One dense conv with the block-diagonal kernel: `groups` times the FLOPs, dense speed."""
    return _native_conv(x, _block_diagonal(kernel, groups), strides, _pads(padding), 1)


def _taps(x, kh, kw, strides, pads):
    """The kh*kw strided windows of padded NHWC `x`, one per kernel tap, row-major."""
    (top, bottom), (left, right) = pads
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
    )
    n, h, w, c = x.shape
    ho, wo = (h - kh) // strides + 1, (w - kw) // strides + 1
    return [
        jax.lax.slice(
            x,
            (0, a, b, 0),
            (n, a + strides * (ho - 1) + 1, b + strides * (wo - 1) + 1, c),
            (1, strides, strides, 1),
        )
        for a in range(kh)
        for b in range(kw)
    ]


def _shift_forward(x, kernel, strides, pads, groups):
    """Sum over taps and in-group channels of a shifted input channel times a weight row.

    Written as kh*kw*(in/groups) broadcast multiply-adds, which XLA fuses into a loop over the
    output: no im2col buffer and no tiny matmuls, so it suits narrow groups. The loop over
    kernel rows is a `fori_loop` on purpose: XLA CPU copies a cheap-looking elementwise
    fusion into every consumer (in training, the output's three: the next BN, its gradient
    and the ReLU mask), and drops `optimization_barrier`; a loop's result is materialized.
    """
    kh, kw, group_in, out = kernel.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    w = kernel.astype(acc).reshape(kh, kw, group_in, groups, out // groups)
    (top, bottom), (left, right) = pads
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
    )
    n, h, wd, _ = x.shape
    ho, wo = (h - kh) // strides + 1, (wd - kw) // strides + 1

    def add_kernel_row(a, y):
        rows = jax.lax.dynamic_slice_in_dim(x, a, strides * (ho - 1) + 1, axis=1)[:, ::strides]
        w_row = jax.lax.dynamic_index_in_dim(w, a, keepdims=False)
        for b in range(kw):
            xt = rows[:, :, b : b + strides * (wo - 1) + 1 : strides].astype(acc)
            xt = xt.reshape(n, ho, wo, groups, 1, group_in)
            for i in range(group_in):
                y = y + xt[..., i] * w_row[b, i]
        return y

    y = parallel.vary_like(jnp.zeros((n, ho, wo, groups, out // groups), acc), x, kernel)
    y = jax.lax.fori_loop(0, kh, add_kernel_row, y)
    return y.reshape(n, ho, wo, out).astype(x.dtype)


def _matmul_forward(x, kernel, strides, pads, groups):
    """im2col in group-major order, then one batched matmul over the groups."""
    kh, kw, group_in, out = kernel.shape
    taps = _taps(x, kh, kw, strides, pads)
    n, ho, wo, _ = taps[0].shape
    patches = jnp.stack(taps, axis=3).reshape(n * ho * wo, kh * kw, groups, group_in)
    patches = patches.transpose(2, 0, 1, 3).reshape(groups, n * ho * wo, kh * kw * group_in)
    w = kernel.reshape(kh * kw, group_in, groups, out // groups).transpose(2, 0, 1, 3)
    w = w.reshape(groups, kh * kw * group_in, out // groups)
    y = jax.lax.dot_general(
        patches, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )
    return y.transpose(1, 0, 2).reshape(n, ho, wo, out).astype(x.dtype)


def _input_grad(forward, dy, kernel, x_shape, strides, padding, groups):
    """The transposed conv: `forward` on the stride-dilated `dy` with the flipped kernel."""
    kh, kw, group_in, out = kernel.shape
    flipped = kernel.reshape(kh, kw, group_in, groups, out // groups)[::-1, ::-1]
    flipped = flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, out // groups, groups * group_in)
    _, h, w, _ = x_shape
    _, ho, wo, _ = dy.shape
    # Negative high padding crops the rows that a stride never reached.
    dilated = jax.lax.pad(
        dy,
        jnp.zeros((), dy.dtype),
        (
            (0, 0, 0),
            (kh - 1 - padding, h - 1 + padding - strides * (ho - 1), strides - 1),
            (kw - 1 - padding, w - 1 + padding - strides * (wo - 1), strides - 1),
            (0, 0, 0),
        ),
    )
    return forward(dilated, flipped, 1, ((0, 0), (0, 0)), groups)


def _weight_grad(x, dy, kernel_shape, strides, padding, groups):
    """The kernel gradient as one native conv that contracts over images and positions.

    Images become the feature axis and the output map the window, so `feature_group_count`
    splits the contraction by group: XLA runs this far faster than the `batch_group_count`
    conv that autodiff of `_xla` emits (over 50x at ResNeXt-50's first stage).
    """
    kh, kw, group_in, out = kernel_shape
    n, h, w, _ = x.shape
    _, ho, wo, _ = dy.shape
    lhs = x.reshape(n, h, w, groups, group_in).transpose(4, 1, 2, 3, 0)
    lhs = lhs.reshape(group_in, h, w, groups * n)
    rhs = dy.reshape(n, ho, wo, groups, out // groups).transpose(1, 2, 0, 3, 4)
    rhs = rhs.reshape(ho, wo, n, out)
    grad = jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(1, 1),
        padding=(
            (padding, kh + strides * (ho - 1) - h - padding),
            (padding, kw + strides * (wo - 1) - w - padding),
        ),
        rhs_dilation=(strides, strides),
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
        preferred_element_type=jnp.float32,
    )
    return grad.transpose(1, 2, 0, 3)


def _with_fast_grads(forward):
    """An impl running `forward`, its transpose for the input grad, and `_weight_grad`."""

    @partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def conv(x, kernel, strides, padding, groups):
        return forward(x, kernel, strides, _pads(padding), groups)

    def conv_fwd(x, kernel, strides, padding, groups):
        return conv(x, kernel, strides, padding, groups), (x, kernel)

    def conv_bwd(strides, padding, groups, residuals, dy):
        x, kernel = residuals
        dx = _input_grad(forward, dy, kernel, x.shape, strides, padding, groups)
        dw = _weight_grad(x, dy, kernel.shape, strides, padding, groups)
        return dx.astype(x.dtype), dw.astype(kernel.dtype)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


def _pointwise_dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pointwise(x, kernel, strides, padding, groups):
    """A dense 1x1 conv as one matmul over all positions, with matmuls for both gradients.

    XLA CPU computes a 1x1 conv's kernel gradient as a convolution whose window is the whole
    feature map, 2-4x slower than this matmul over positions (docs/benchmarks.md).
    """
    if kernel.shape[:2] != (1, 1) or padding or groups != 1:
        raise ValueError("pointwise needs an ungrouped 1x1 kernel and no padding")
    xs = x[:, ::strides, ::strides]
    n, h, w, c = xs.shape
    y = _pointwise_dot(xs.reshape(n * h * w, c), kernel.reshape(c, -1), ((1,), (0,)))
    return y.reshape(n, h, w, -1).astype(x.dtype)


def _pointwise_fwd(x, kernel, strides, padding, groups):
    return _pointwise(x, kernel, strides, padding, groups), (x, kernel)


def _pointwise_bwd(strides, padding, groups, residuals, dy):
    x, kernel = residuals
    xs = x[:, ::strides, ::strides]
    n, h, w, c = xs.shape
    dy2 = dy.reshape(n * h * w, -1)
    dw = _pointwise_dot(xs.reshape(n * h * w, c), dy2, ((0,), (0,)))
    dx = _pointwise_dot(dy2, kernel.reshape(c, -1), ((1,), (1,))).reshape(xs.shape)
    if strides > 1:  # back to the full map: zeros where the stride skipped a position
        _, full_h, full_w, _ = x.shape
        dx = jax.lax.pad(
            dx,
            jnp.zeros((), dx.dtype),
            (
                (0, 0, 0),
                (0, full_h - 1 - strides * (h - 1), strides - 1),
                (0, full_w - 1 - strides * (w - 1), strides - 1),
                (0, 0, 0),
            ),
        )
    return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn(x, kernel, strides, padding, groups):
    """oneDNN's conv and its two gradients as XLA FFI custom calls (resnext_jax.onednn).

    oneDNN runs in float32 here; other dtypes are cast to it and back, as `shift` also
    accumulates in float32.
    """
    f32 = jnp.float32
    return onednn.forward(x.astype(f32), kernel.astype(f32), strides, padding, groups).astype(
        x.dtype
    )


def _onednn_fwd(x, kernel, strides, padding, groups):
    return _onednn(x, kernel, strides, padding, groups), (x, kernel)


def _onednn_bwd(strides, padding, groups, residuals, dy):
    x, kernel = residuals
    f32 = jnp.float32
    x32, k32, dy32 = x.astype(f32), kernel.astype(f32), dy.astype(f32)
    dx = onednn.input_grad(dy32, k32, x.shape, strides, padding, groups)
    dw = onednn.kernel_grad(x32, dy32, kernel.shape, strides, padding, groups)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_onednn.defvjp(_onednn_fwd, _onednn_bwd)


def _matmul(x, kernel, strides, padding, groups):
    """`_matmul_forward` under plain autodiff: its grads are matmuls over the same patches."""
    return _matmul_forward(x, kernel, strides, _pads(padding), groups)


IMPLS: dict[str, Callable] = {
    "xla": _xla,
    "dense": _dense,
    "shift": _with_fast_grads(_shift_forward),
    "matmul": _matmul,
    "xla_wgrad": _with_fast_grads(_native_conv),
    "onednn": _onednn,
}


AUTO = ("auto", "xla_auto")  # the two choosers; `xla_auto` never picks `onednn`
CHOICES = (*AUTO, *IMPLS)


def onednn_usable() -> bool:
    """Whether `auto` may pick `onednn`: it is built and loaded.

    On any number of devices: the trainer's and the benchmark's steps run one program per
    device (resnext_jax.parallel), so XLA never has to split the custom call over a mesh,
    which it cannot. Under a plain `jax.jit` over a batch-sharded input it would run the
    whole batch on every device. On 2 and 8 simulated CPU devices it trained ResNeXt-50
    faster than `xla_auto` (docs/benchmarks.md, "Several devices").
    """
    return onednn.available()


def select_impl(x_shape, kernel_shape, strides, groups, backend=None, use_onednn=None) -> str:
    """The implementation `auto` picks for this shape on this backend.

    The rules come from scripts/bench_grouped_conv.py on a 2-core x86 CPU with YNNPACK's
    fusions off (`runtime.compiler_options`; docs/benchmarks.md, the "block" column).
    Dense convs: `pointwise` for 1x1, XLA's own conv otherwise. Grouped convs: `onednn`
    wherever it can run (`use_onednn`, default `onednn_usable()`): 0.07-0.25x a dense conv's
    time at every ResNeXt-50 32x4d shape, 1.2-3.0x faster than the best XLA formulation.
    Without it (`xla_auto`), `shift` at narrow groups (in/groups <= 8, where XLA's native
    grouped conv is slow: ResNeXt-50 32x4d's 56x56 stage at 2.3x `shift`'s time, depthwise
    worse), and at in/groups <= 16 on stride-1 maps of 56x56 or more with at most 128
    channels (8x14d's first stage); `xla_wgrad` everywhere else (0.1-1.0x a dense conv's
    time from in/groups = 16 up). Off CPU there is no measurement yet, so XLA's native conv
    stays the default.
    """
    backend = backend or jax.default_backend()
    kh, kw, group_in, _ = kernel_shape
    if backend != "cpu":
        return "xla"
    if groups == 1:
        return "pointwise" if (kh, kw) == (1, 1) else "xla"
    if onednn_usable() if use_onednn is None else use_onednn:
        return "onednn"
    # `dense` ties or wins at widths <= 64 too, but its zero blocks would show up in every
    # FLOP count taken from XLA (resnext_jax.stats), so `auto` never picks it; `matmul`
    # was never more than about 6% faster than `xla_wgrad` once YNNPACK's fusions were off.
    taps = kh * kw * group_in  # multiply-adds per output of `shift`'s fused loop body
    if group_in <= 8 and taps <= 72:
        return "shift"
    large_map = min(x_shape[1:3]) >= 56
    narrow = x_shape[3] <= 128  # at 56x56, in/groups 16 lost on 192 and 256 channels
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
    if impl == "pointwise":  # not a grouped-conv impl: `auto`'s choice for dense 1x1 convs
        return _pointwise(x, kernel, strides, padding, groups)
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {list(CHOICES)}")
    return IMPLS[impl](x, kernel, strides, padding, groups)


class Conv(nn.Module):
    """Bias-free square conv with symmetric padding k//2 (torchvision's), optionally grouped.

    `impl` chooses how a grouped conv runs; an ungrouped one always takes `auto` (on CPU,
    `pointwise` for 1x1 and XLA's own conv otherwise), so forcing an implementation for a
    model's grouped 3x3s leaves its dense convs alone.
    """

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
            impl=self.impl if self.groups > 1 else "auto",
        )
