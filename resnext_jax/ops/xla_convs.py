"""The XLA formulations of a convolution: the native one and its faster rewrites on CPU.

Each takes `(x, kernel, strides, padding, groups)`: NHWC `x`, the `(kh, kw, in/groups, out)`
kernel that `flax.linen.Conv(feature_group_count=groups)` stores, symmetric `padding`.
resnext_jax/ops/conv.py names them and chooses among them:

    native     XLA's own `feature_group_count` conv
    dense      one dense conv with the block-diagonal kernel (groups times the FLOPs)
    shift      kh*kw*in/groups fused multiply-adds of shifted inputs (narrow groups)
    matmul     im2col, then a matmul batched over groups
    xla_wgrad  the native conv with `_weight_grad` for its kernel gradient (wide groups)
    pointwise  a dense 1x1 conv as one matmul over positions, matmuls for both gradients

XLA CPU runs narrow-group convs and their kernel gradient (a `batch_group_count` conv) far
slower than the dense conv they replace, and a 1x1 conv's kernel gradient as a conv with the
whole feature map as its window; docs/benchmarks.md ("Grouped convolution on XLA CPU") has
the measurements.
"""

from functools import partial

import jax
import jax.numpy as jnp

from resnext_jax.devices import parallel

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _pads(padding):
    return ((padding, padding), (padding, padding))


def native(x, kernel, strides, padding, groups):
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


def block_diagonal(kernel, groups):
    """The dense `(kh, kw, in, out)` kernel equal to a grouped one: zeros off the diagonal."""
    kh, kw, group_in, out = kernel.shape
    blocks = kernel.reshape(kh, kw, 1, group_in, groups, out // groups)
    mask = jnp.eye(groups, dtype=kernel.dtype).reshape(1, 1, groups, 1, groups, 1)
    return (blocks * mask).reshape(kh, kw, groups * group_in, out)


def dense(x, kernel, strides, padding, groups):
    """One dense conv with the block-diagonal kernel: `groups` times the FLOPs, dense speed."""
    return _native_conv(x, block_diagonal(kernel, groups), strides, _pads(padding), 1)


def _windows(x, kh, kw, strides, pads):
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
    windows = _windows(x, kh, kw, strides, pads)
    n, ho, wo, _ = windows[0].shape
    patches = jnp.stack(windows, axis=3).reshape(n * ho * wo, kh * kw, groups, group_in)
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
def pointwise(x, kernel, strides, padding, groups):
    """A dense 1x1 conv as one matmul over all positions, with matmuls for both gradients.

    XLA CPU computes a 1x1 conv's kernel gradient as a convolution whose window is the whole
    feature map, slower than this matmul over positions (docs/benchmarks.md).
    """
    if kernel.shape[:2] != (1, 1) or padding or groups != 1:
        raise ValueError("pointwise needs an ungrouped 1x1 kernel and no padding")
    xs = x[:, ::strides, ::strides]
    n, h, w, c = xs.shape
    y = _pointwise_dot(xs.reshape(n * h * w, c), kernel.reshape(c, -1), ((1,), (0,)))
    return y.reshape(n, h, w, -1).astype(x.dtype)


def _pointwise_fwd(x, kernel, strides, padding, groups):
    return pointwise(x, kernel, strides, padding, groups), (x, kernel)


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


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def matmul(x, kernel, strides, padding, groups):
    """`_matmul_forward` under plain autodiff: its grads are matmuls over the same patches."""
    return _matmul_forward(x, kernel, strides, _pads(padding), groups)


shift = _with_fast_grads(_shift_forward)
xla_wgrad = _with_fast_grads(_native_conv)
