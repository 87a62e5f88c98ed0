import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.ops import conv, onednn, xla_convs
from resnext_jax.ops.conv import CHOICES, IMPLS, Conv, conv2d, select_impl
from tests.conftest import slow_unless

# (width_in, width_out, groups): dense, two and four groups, unequal in/out, depthwise.
GROUPINGS = [(8, 8, 1), (8, 8, 2), (8, 16, 4), (12, 12, 12)]


@partial(jax.jit, static_argnums=(0, 3, 4))
def _loss_and_grads(impl, x, kernel, strides, groups):
    def loss(x, kernel):
        y = conv2d(
            x, kernel, strides=strides, padding=kernel.shape[0] // 2, groups=groups, impl=impl
        )
        return jnp.sum(jnp.sin(y)), y  # sin: a cotangent that differs at every position

    (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, kernel)
    return y, *grads


def _skip_unbuilt(impl):
    """`onednn` runs where it is built; tests/ops/test_onednn.py fails where it should be but is
    not."""
    if impl == "onednn" and not onednn.available():
        pytest.skip(f"onednn unavailable: {onednn.unavailable_reason()}")


@pytest.mark.parametrize("impl", [i for i in CHOICES if i != "xla"])
@pytest.mark.parametrize("k,strides", slow_unless([(1, 1), (1, 2), (3, 1), (3, 2)], [(3, 2)]))
@pytest.mark.parametrize(
    "width_in,width_out,groups", slow_unless(GROUPINGS, [(8, 8, 2), (12, 12, 12)])
)
def test_impl_matches_xla(impl, k, strides, width_in, width_out, groups):
    _skip_unbuilt(impl)
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, width_in))  # odd, unequal H and W
    kernel = jax.random.normal(jax.random.key(1), (k, k, width_in // groups, width_out))
    expected = _loss_and_grads("xla", x, kernel, strides, groups)
    got = _loss_and_grads(impl, x, kernel, strides, groups)
    for name, e, g in zip(("output", "input grad", "kernel grad"), expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("strides", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 7, 9, 8, 16), (3, 6, 5, 24, 8)])
def test_pointwise_matches_xla(shape, strides):
    n, h, w, width_in, width_out = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, width_in))
    kernel = jax.random.normal(jax.random.key(1), (1, 1, width_in, width_out))
    expected = _loss_and_grads("xla", x, kernel, strides, 1)
    got = _loss_and_grads("pointwise", x, kernel, strides, 1)
    for name, e, g in zip(("output", "input grad", "kernel grad"), expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(e))))


def test_pointwise_keeps_bfloat16_and_refuses_other_kernels():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (1, 1, 8, 4), jnp.bfloat16)
    got = _loss_and_grads("pointwise", x, kernel, 2, 1)
    ref = _loss_and_grads("xla", x.astype(jnp.float32), kernel.astype(jnp.float32), 2, 1)
    for g, e in zip(got, ref, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), e, atol=0.05 * float(jnp.max(abs(e))))
    for kernel_shape, groups in [((3, 3, 8, 8), 1), ((1, 1, 2, 8), 4)]:
        with pytest.raises(ValueError, match="ungrouped 1x1"):
            conv2d(x, jnp.zeros(kernel_shape), groups=groups, impl="pointwise")


@pytest.mark.parametrize("impl", slow_unless(CHOICES, ("auto", "shift", "onednn")))
def test_impl_runs_7x7_and_bfloat16(impl):
    _skip_unbuilt(impl)
    x = jax.random.normal(jax.random.key(0), (2, 11, 11, 8), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (7, 7, 2, 8), jnp.bfloat16)
    y, dx, dw = _loss_and_grads(impl, x, kernel, 2, 4)
    ref = _loss_and_grads("xla", x.astype(jnp.float32), kernel.astype(jnp.float32), 2, 4)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    for got, e in zip((y, dx, dw), ref, strict=True):
        np.testing.assert_allclose(
            got.astype(jnp.float32), e, atol=0.05 * float(jnp.max(jnp.abs(e)))
        )


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize(
    "x_shape,groups,strides,on_cpu",
    [((16, 56, 56, 128), 1, 1, "xla"),
     ((16, 56, 56, 128), 32, 1, "shift"),      # 32x4d stage 1: in/groups 4
     ((16, 56, 56, 112), 8, 1, "shift"),       # 8x14d stage 1: in/groups 14
     ((16, 56, 56, 224), 8, 2, "xla_wgrad"),   # 8x14d stage 2, first block
     ((16, 56, 56, 112), 8, 2, "xla_wgrad"),   # in/groups 14, stride 2
     ((16, 28, 28, 112), 8, 1, "xla_wgrad"),   # in/groups 14 on a smaller map
     ((16, 56, 56, 128), 8, 1, "shift"),       # in/groups 16, 128 channels: a tie
     ((16, 56, 56, 256), 16, 1, "xla_wgrad"),  # in/groups 16, 256 channels
     ((16, 56, 56, 192), 12, 1, "xla_wgrad"),  # in/groups 16, 192 channels
     ((16, 56, 56, 96), 8, 1, "shift"),        # in/groups 12, 96 channels
     ((16, 14, 14, 1024), 32, 2, "xla_wgrad"),
     ((128, 28, 28, 64), 8, 1, "shift"),
     ((128, 32, 32, 64), 64, 1, "shift"),      # depthwise
     ((128, 32, 32, 64), 2, 1, "xla_wgrad")],
)  # fmt: skip
@pytest.mark.parametrize("use_onednn", [False, True])
def test_select_impl_follows_the_measured_rules(
    x_shape, groups, strides, on_cpu, backend, use_onednn
):
    """The choices docs/benchmarks.md's tables give for these shapes; XLA off CPU."""
    width = x_shape[-1]
    kernel = (3, 3, width // groups, width)
    choice = select_impl(x_shape, kernel, strides, groups, backend, use_onednn=use_onednn)
    assert choice in IMPLS
    if backend != "cpu":
        assert choice == "xla"
    elif use_onednn:  # every conv, dense ones too
        assert choice == "onednn"
    else:
        assert choice == on_cpu
    pointwise = select_impl(x_shape, (1, 1, width, width), strides, 1, backend, use_onednn)
    if backend != "cpu":
        assert pointwise == "xla"
    else:
        assert pointwise == ("onednn" if use_onednn else "pointwise")


def test_auto_picks_onednn_wherever_it_is_built_on_any_device_count(monkeypatch):
    shape, kernel = (16, 56, 56, 128), (3, 3, 4, 128)
    monkeypatch.setattr(onednn, "available", lambda: True)
    assert select_impl(shape, kernel, 1, 32, "cpu") == "onednn"
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # per-device steps: no split needed
    assert select_impl(shape, kernel, 1, 32, "cpu") == "onednn"
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert select_impl(shape, kernel, 1, 32, "cpu") == "shift"


def _calls_onednn(impl):
    x, kernel = jnp.zeros((2, 8, 8, 16)), jnp.zeros((3, 3, 4, 16))
    grad = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, padding=1, groups=4, impl=impl)), (0, 1))
    return "resnext_onednn_" in str(jax.make_jaxpr(grad)(x, kernel))  # any of its calls


@pytest.mark.skipif(not onednn.available() or jax.default_backend() != "cpu",
                    reason="oneDNN runs on CPU where it is built")  # fmt: skip
def test_auto_calls_onednn_where_built_and_xla_auto_never():
    assert _calls_onednn("auto")
    assert not _calls_onednn("xla_auto")


def test_auto_keeps_to_xla_where_onednn_is_unavailable(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert not _calls_onednn("auto")


def test_conv_module_kernel_is_hwio_for_every_impl():
    x = jnp.zeros((1, 8, 8, 16))
    shapes = {
        jax.eval_shape(Conv(32, 3, groups=4, impl=impl).init, jax.random.key(0), x)["params"][
            "kernel"
        ].shape
        for impl in CHOICES
    }
    assert shapes == {(3, 3, 4, 32)}


def test_forced_impl_reaches_grouped_convs_only(monkeypatch):
    calls = []
    for name in conv.KERNELS:
        impl = conv.KERNELS[name]
        monkeypatch.setitem(
            conv.KERNELS, name,
            lambda *a, _name=name, _impl=impl: calls.append((_name, a[-1])) or _impl(*a),
        )  # fmt: skip
    x = jnp.ones((1, 8, 8, 16))
    for groups in (1, 4):
        Conv(16, 3, groups=groups, impl="shift").init(jax.random.key(0), x)
    dense = conv.select_impl(x.shape, (3, 3, 16, 16), 1, 1)  # what `auto` picks for it
    assert calls == [(dense, 1), ("shift", 4)]
    calls.clear()
    for groups in (1, 4):  # except xla_auto, which keeps every conv, dense ones too, in XLA
        Conv(16, 3, groups=groups, impl="xla_auto").init(jax.random.key(0), x)
    assert calls == [("xla", 1), ("shift", 4)]


@pytest.mark.parametrize("features,groups", [(32, 3), (30, 4)])
def test_conv_module_rejects_groups_that_do_not_divide(features, groups):
    with pytest.raises(ValueError, match="groups must divide"):
        Conv(features, 3, groups=groups).init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)))


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv2d(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 1, 4, 4)), impl="nope")


def test_block_diagonal_kernel_is_zero_off_the_groups():
    kernel = jnp.ones((1, 1, 2, 6))
    dense = xla_convs.block_diagonal(kernel, 3)[0, 0]
    np.testing.assert_array_equal(dense, np.kron(np.eye(3), np.ones((2, 2))))


def test_auto_picks_only_named_kernels():
    """Every pick of `select_impl` is a key of KERNELS, on every backend and with or without
    oneDNN, over the convs of ResNet-50 and ResNeXt-50 (32x4d, 8x14d, depthwise)."""
    picks = set()
    for backend in ("cpu", "gpu"):
        for use_onednn in (True, False):
            for size, width, groups, strides, k in itertools.product(
                (56, 28, 14, 7), (64, 128, 256, 512), (1, 8, 32, 64), (1, 2), (1, 3)
            ):
                kernel = (k, k, width // groups, width)
                picks.add(conv.select_impl((8, size, size, width), kernel, strides, groups,
                                           backend=backend, use_onednn=use_onednn))  # fmt: skip
    assert picks <= set(conv.KERNELS), picks - set(conv.KERNELS)
    assert {"pointwise", "onednn", "shift", "xla_wgrad", "xla"} <= picks
