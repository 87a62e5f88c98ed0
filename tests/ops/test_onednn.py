"""The oneDNN custom calls: built where they should be, clear errors where they cannot be."""

import ctypes
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.ops import conv, onednn

# requirements.txt installs oneDNN's wheels on x86-64 Linux; there the path must build.
EXPECTED = (
    sys.platform.startswith("linux")
    and platform.machine() == "x86_64"
    and os.environ.get(onednn.SWITCH, "1") != "0"
)
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN path not built here")
needs_own_norm = pytest.mark.skipif(
    not (onednn.available() and onednn._library.ResnextNormSupported()),
    reason="no AVX-512 here: the own batch-norm kernel never runs",
)


def test_onednn_is_built_where_requirements_install_it():
    if not EXPECTED:
        pytest.skip("oneDNN's wheels are for x86-64 Linux")
    assert onednn.available(), onednn.unavailable_reason()


def _fake_prefix(root, lib="lib"):
    (root / "include" / "oneapi" / "dnnl").mkdir(parents=True)
    (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").touch()
    (root / lib).mkdir(parents=True)
    (root / lib / "libdnnl.so").touch()
    return root


def test_find_onednn_needs_headers_and_library(tmp_path):
    assert onednn.find_onednn([tmp_path]) is None
    debian = _fake_prefix(tmp_path / "usr", "lib/x86_64-linux-gnu")
    assert onednn.find_onednn([tmp_path, debian]) == (
        debian / "include",
        debian / "lib/x86_64-linux-gnu",
    )
    (debian / "lib/x86_64-linux-gnu/libdnnl.so").unlink()
    assert onednn.find_onednn([debian]) is None


def test_build_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(onednn, "find_onednn", lambda: None)
    with pytest.raises(onednn.OnednnUnavailable, match="onednn-devel-cpu-gomp"):
        onednn.build()
    prefix = _fake_prefix(tmp_path / "prefix")
    monkeypatch.setattr(onednn, "find_onednn", lambda: (prefix / "include", prefix / "lib"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(onednn.OnednnUnavailable, match="no C.. compiler"):
        onednn.build()


@pytest.fixture
def fake_onednn(tmp_path, monkeypatch):
    """A fake oneDNN install and an empty build cache (returned) for build() to use."""
    monkeypatch.setenv(onednn.CACHE, str(tmp_path / "cache"))
    prefix = _fake_prefix(tmp_path / "prefix")
    monkeypatch.setattr(onednn, "find_onednn", lambda: (prefix / "include", prefix / "lib"))
    return tmp_path / "cache"


def _script(path, body):
    """An executable shell script, to stand in for the compiler as $CXX."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _writes_its_output(tmp_path):
    """A fake compiler that writes `built` to its last argument (build() ends with -o PATH)."""
    return _script(tmp_path / "fake-cxx", 'for last; do :; done\necho built > "$last"\n')


@pytest.mark.skipif(onednn._compiler() is None, reason="no C++ compiler")
def test_a_failed_build_shows_the_compiler_and_leaves_no_library(
    tmp_path, fake_onednn, monkeypatch
):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCES", (broken,))
    with pytest.raises(onednn.OnednnUnavailable, match="building broken.cc failed"):
        onednn.build()
    assert not list(fake_onednn.rglob("*.so"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to run through `env`")
@pytest.mark.skipif(onednn.find_onednn() is None, reason="no oneDNN to link against")
def test_cxx_may_be_a_command_line(tmp_path, monkeypatch):
    """`CXX="ccache g++"` is a compiler with an argument, not a program named `ccache g++`."""
    monkeypatch.setenv(onednn.CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "env  g++")
    assert onednn._compiler() == [shutil.which("env"), "g++"]
    tiny = tmp_path / "tiny.cc"
    tiny.write_text('extern "C" __attribute__((visibility("default"))) int answer() { return 42; }')
    monkeypatch.setattr(onednn, "SOURCES", (tiny,))
    assert ctypes.CDLL(str(onednn.build())).answer() == 42
    monkeypatch.setenv("CXX", "'g++")  # unbalanced quote
    assert onednn._compiler() is None


def _gone(pid, within=10.0):
    """Whether process `pid` has ended (exited or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hung_compiler_is_stopped_with_all_it_started(tmp_path, fake_onednn, monkeypatch):
    pidfile = tmp_path / "child.pid"
    hung = _script(tmp_path / "hung-cxx", f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    monkeypatch.setenv("CXX", str(hung))
    monkeypatch.setenv(onednn.BUILD_TIMEOUT, "soon")
    with pytest.raises(onednn.OnednnUnavailable, match="BUILD_TIMEOUT must be a positive number"):
        onednn.build()
    monkeypatch.setenv(onednn.BUILD_TIMEOUT, "2")
    start = time.monotonic()
    with pytest.raises(onednn.OnednnUnavailable, match=r"took over 2 s and was stopped .*hung-cxx"):
        onednn.build()
    assert time.monotonic() - start < 20
    assert _gone(int(pidfile.read_text()))  # the compiler's own child too (cc1plus, say)
    assert not list(fake_onednn.iterdir())  # neither a library nor a temporary directory


def test_a_cache_others_can_write_is_refused_before_building(tmp_path, fake_onednn, monkeypatch):
    """A shared cache (say under /tmp) could hold anyone's library: loading it runs their code."""
    monkeypatch.setenv("CXX", str(_writes_its_output(tmp_path)))
    monkeypatch.delenv(onednn.SWITCH, raising=False)
    fake_onednn.mkdir(mode=0o700)
    fake_onednn.chmod(0o777)
    with pytest.raises(onednn.OnednnUnavailable, match="refusing") as refused:
        onednn.build()
    assert f"{fake_onednn}: it is writable by group or others (mode drwxrwxrwx)" in str(
        refused.value
    )
    assert "chmod go-w" in str(refused.value) and onednn.CACHE in str(refused.value)
    assert not list(fake_onednn.iterdir())  # nothing built into it
    assert onednn._load.__wrapped__() == str(refused.value)  # so `auto` keeps to XLA's convs


def test_the_cache_and_library_must_be_yours_and_private(tmp_path, fake_onednn, monkeypatch):
    monkeypatch.setenv("CXX", str(_writes_its_output(tmp_path)))
    umask = os.umask(0o002)  # as on systems with a group per user: the compiler's output is g+w
    try:
        path = onednn.build()
    finally:
        os.umask(umask)
    assert path.parent == fake_onednn and path.read_text() == "built\n"
    assert stat.S_IMODE(fake_onednn.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0
    assert onednn.build() == path  # the cached library passes the check
    path.chmod(0o775)
    with pytest.raises(onednn.OnednnUnavailable, match="writable by group or others") as refused:
        onednn.build()
    assert f"refusing the build cache's {path}:" in str(refused.value)
    path.chmod(0o755)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(onednn.OnednnUnavailable, match=f"owned by uid {uid}, not by you"):
        onednn.build()


@pytest.mark.slow
@needs_onednn
def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE, str(tmp_path))
    path = onednn.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert onednn.build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    changed = tmp_path / "changed.cc"
    changed.write_text(onednn.SOURCES[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(onednn, "SOURCES", (changed, *onednn.SOURCES[1:]))
    assert onednn.build() != path


def test_the_onednn_impl_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(onednn, "_load", lambda: "no oneDNN on this machine")
    # Not left cached as False for the tests after this one (bfloat16_native is cached).
    monkeypatch.setattr(onednn, "bfloat16_native", lambda: False)
    x, kernel = jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 2, 8))
    with pytest.raises(onednn.OnednnUnavailable, match="no oneDNN on this machine.*conv_impl"):
        conv.conv2d(x, kernel, padding=1, groups=4, impl="onednn")
    # auto falls back to the XLA formulations instead
    assert conv.select_impl(x.shape, kernel.shape, 1, 4, "cpu") == "shift"


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(onednn.SWITCH, "0")
    assert onednn._load.__wrapped__() == f"turned off by {onednn.SWITCH}=0"


@needs_onednn
def test_the_custom_calls_check_their_shapes_and_dtype():
    x, kernel = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 4, 16))
    call = jax.ffi.ffi_call(onednn._name("conv_forward"), jax.ShapeDtypeStruct((2, 7, 8, 16), "f4"))
    with pytest.raises(Exception, match="output shape does not match"):
        jax.block_until_ready(
            call(x, kernel, stride=np.int64(1), padding=np.int64(1), groups=np.int64(4))
        )
    with pytest.raises(Exception, match="kernel does not match the groups"):
        jax.block_until_ready(onednn.forward(x, kernel, 1, 1, 2))
    with pytest.raises(TypeError, match="float32 or bfloat16.*got bfloat16 and float32"):
        onednn.forward(x.astype(jnp.bfloat16), kernel, 1, 1, 4)
    with pytest.raises(TypeError, match="float32 or bfloat16.*got float16"):
        onednn.forward(x.astype(jnp.float16), kernel.astype(jnp.float16), 1, 1, 4)
    mixed = jax.ffi.ffi_call(
        onednn._name("conv_forward"), jax.ShapeDtypeStruct((2, 8, 8, 16), "f4")
    )
    with pytest.raises(Exception, match="all float32 or all bfloat16"):
        y = mixed(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                  stride=np.int64(1), padding=np.int64(1), groups=np.int64(4))  # fmt: skip
        jax.block_until_ready(y)


def _ulps_apart(got, want):
    """The largest difference between bfloat16 arrays, in units of the last place at the
    largest magnitude of `want` (2**-8 of its binade)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want).max())) - 7)
    return float(np.abs(got - want).max() / ulp)


@needs_onednn
@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,groups",
    [((4, 10, 10, 64), (3, 3, 2, 64), 1, 32),  # ResNeXt's grouped 3x3
     ((4, 10, 10, 64), (1, 1, 64, 128), 2, 1),  # a strided projection
     ((2, 20, 20, 3), (7, 7, 3, 16), 2, 1),  # the stem
     ((2, 9, 9, 64), (3, 3, 16, 64), 2, 4)],
)  # fmt: skip
def test_bfloat16_convs_run_as_bfloat16_and_match_xla(x_shape, kernel_shape, strides, groups):
    """No cast to float32 around the calls, and XLA's bfloat16 conv's results: both multiply
    bfloat16 exactly and sum in float32, so only the summation order may differ."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape).astype(jnp.bfloat16)
    kernel = (jax.random.normal(keys[1], kernel_shape) * 0.1).astype(jnp.bfloat16)
    padding = kernel_shape[0] // 2

    def run(impl):
        y, vjp = jax.vjp(lambda x, k: impl(x, k, strides, padding, groups), x, kernel)
        return (y, *vjp(jax.random.normal(keys[2], y.shape).astype(jnp.bfloat16)))

    def loss(x, k):
        return jnp.sum(onednn.grouped_conv(x, k, strides, padding, groups))

    hlo = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, kernel).as_text()
    calls = [line for line in hlo.splitlines() if "custom_call @resnext_onednn_conv" in line]
    assert len(calls) == 3 and not any("f32" in line for line in calls), calls
    for got, want in zip(run(onednn.grouped_conv), run(conv.xla_convs.native), strict=True):
        assert got.dtype == want.dtype == jnp.bfloat16
        assert _ulps_apart(got, want) <= 2


@needs_onednn
@pytest.mark.slow
def test_an_exception_of_any_type_reaches_python_as_an_error(tmp_path, monkeypatch):
    """The handlers' guard around a body that throws what is no std::exception: not an abort."""
    harness = tmp_path / "throws.cc"
    harness.write_text(
        f'#include "{onednn.SOURCES[0]}"\n'
        "ffi::Error Throws(ffi::ResultBuffer<ffi::F32>) {\n"
        '  return resnext_onednn::Guard("onednn conv", [] { throw 42; });\n'
        "}\n"
        "EXPORT XLA_FFI_Error* ResnextTestThrows(XLA_FFI_CallFrame*);\n"
        "XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextTestThrows, Throws,\n"
        "                              ffi::Ffi::Bind().Ret<ffi::Buffer<ffi::F32>>());\n"
    )
    monkeypatch.setenv(onednn.CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(onednn, "SOURCES", (harness,))
    script = """
import ctypes, sys, jax, numpy as np
handler = jax.ffi.pycapsule(ctypes.CDLL(sys.argv[1]).ResnextTestThrows)
jax.ffi.register_ffi_target("resnext_test_throws", handler, platform="cpu")
call = jax.ffi.ffi_call("resnext_test_throws", jax.ShapeDtypeStruct((1,), np.float32))
try:
    jax.block_until_ready(call())
except Exception as e:
    print(e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(onednn.build())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "onednn conv: an exception that is not a std::exception" in done.stdout


@needs_onednn
@pytest.mark.slow
def test_onednn_under_vmap_and_a_sharded_batch_matches_xla():
    """vmap runs the call per example; on a 2-device mesh XLA runs it unsplit, still right."""
    script = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from resnext_jax.ops import conv
x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))
kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 32))
def loss(x, kernel, impl):
    y = conv.conv2d(x, kernel, strides=2, padding=1, groups=4, impl=impl)
    return jnp.sum(jnp.sin(y))
grads = lambda impl: jax.grad(loss, (0, 1))(x, kernel, impl)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(sharded, kernel, "onednn")
want = grads("xla")
for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
per_example = jax.vmap(lambda e: conv.conv2d(e[None], kernel, padding=1, groups=4,
                                                     impl="onednn")[0])(x)
np.testing.assert_allclose(per_example, conv.conv2d(x, kernel, padding=1, groups=4,
                                                            impl="xla"), rtol=1e-4, atol=1e-3)
print(jax.device_count(), conv.select_impl(x.shape, kernel.shape, 1, 4))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "onednn"]  # per-device steps: auto's pick here too


def _xla_batch_norm(x, scale, bias, groups, epsilon, relu=False, add=None):
    """The jax.numpy batch norm of resnext_jax.models.resnet.BatchNorm, on its own."""
    xg = x.reshape(groups, -1, x.shape[-1])
    mean = jnp.mean(xg, axis=1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xg), axis=1, keepdims=True) - jnp.square(mean), 0)
    mul = scale * jax.lax.rsqrt(var + epsilon)
    y = (xg * mul + (bias - mean * mul)).reshape(x.shape)
    if add is not None:
        y = y + add
    return (jax.nn.relu(y) if relu else y), mean[:, 0], var[:, 0]


@needs_onednn
@pytest.mark.parametrize("mode", ["plain", "relu", "add_relu"])
@pytest.mark.parametrize(
    "shape,groups",
    [((4, 7, 9, 16), 1), ((6, 5, 5, 48), 3), ((6, 5, 5, 8), 3), ((8, 1, 1, 4), 2)],
)
def test_batch_norm_matches_the_xla_formulation(shape, groups, mode):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], shape) * 3 + 2  # a mean far from 0: E[x^2]-E[x]^2 is tested
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    dy = jax.random.normal(keys[3], shape)
    add = jax.random.normal(keys[4], shape) if mode == "add_relu" else None
    relu = mode != "plain"

    def run(norm):
        def loss(x, scale, bias, add):
            y, mean, var = norm(x, scale, bias, groups, 1e-5, relu=relu, add=add)
            return jnp.sum(y * dy) + jnp.sum(jnp.tanh(y)), (y, mean, var)

        return jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(x, scale, bias, add)

    grads, outs = run(onednn.batch_norm)
    want_grads, want_outs = run(_xla_batch_norm)
    names = ("y", "mean", "var", "dx", "dscale", "dbias", "dadd")
    for name, got, want in zip(names, (*outs, *grads), (*want_outs, *want_grads), strict=True):
        if want is None:  # no addend, no gradient for it
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()),
                                   err_msg=name)  # fmt: skip
    if relu:
        assert (outs[0] >= 0).all() and (outs[0] == 0).any()


@needs_onednn
def test_batch_norm_statistics_carry_no_gradient():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
    ones, zeros = jnp.ones(8), jnp.zeros(8)
    grad = jax.grad(lambda x: jnp.sum(onednn.batch_norm(x, ones, zeros, 2, 1e-5)[1]))(x)
    assert not grad.any()


@needs_onednn
def test_batch_norm_checks_its_groups_and_dtype():
    x, ones = jnp.ones((6, 2, 2, 4)), jnp.ones(4)
    with pytest.raises(Exception, match="groups must divide n"):
        jax.block_until_ready(onednn.batch_norm(x, ones, ones, 4, 1e-5))
    with pytest.raises(TypeError, match="float32 or bfloat16.*got float16"):
        onednn.batch_norm(x.astype(jnp.float16), ones, ones, 2, 1e-5)
    with pytest.raises(TypeError, match="scale, bias and statistics are float32"):
        onednn.batch_norm(x.astype(jnp.bfloat16), ones.astype(jnp.bfloat16), ones, 2, 1e-5)
    with pytest.raises(TypeError, match="got bfloat16 and float32"):
        onednn.batch_norm(x.astype(jnp.bfloat16), ones, ones, 2, 1e-5, relu=True, add=x)


@needs_onednn
@pytest.mark.parametrize("mode", ["plain", "relu", "add_relu"])
def test_bfloat16_batch_norm_matches_float32_on_the_same_inputs(mode):
    """bfloat16 activations in and out, float32 statistics and parameter gradients: what the
    float32 formulation gives on the same (bfloat16) inputs, up to the output's rounding."""
    keys = jax.random.split(jax.random.key(1), 5)
    shape, groups = (6, 5, 7, 16), 3
    bf = jnp.bfloat16
    x = (jax.random.normal(keys[0], shape) * 3 + 2).astype(bf)
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    dy = jax.random.normal(keys[3], shape).astype(bf)
    add = jax.random.normal(keys[4], shape).astype(bf) if mode == "add_relu" else None
    relu = mode != "plain"

    def run(norm, x, add, dy):
        def forward(x, scale, bias, add):
            return norm(x, scale, bias, groups, 1e-5, relu=relu, add=add)

        outs, vjp = jax.vjp(forward, x, scale, bias, add)
        grads = vjp((dy, jnp.zeros_like(outs[1]), jnp.zeros_like(outs[2])))
        return (*outs, *grads)

    got = jax.jit(partial(run, onednn.batch_norm))(x, add, dy)
    f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
    want = jax.jit(partial(run, _xla_batch_norm))(f32(x), f32(add), f32(dy))
    names = ("y", "mean", "var", "dx", "dscale", "dbias", "dadd")
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        bf16_out = name in ("y", "dx", "dadd")
        assert g.dtype == (bf if bf16_out else jnp.float32), name
        tol = 2.0**-7 if bf16_out else 1e-4  # one bfloat16 rounding of the output
        np.testing.assert_allclose(f32(g), w, rtol=tol, atol=tol * float(jnp.abs(w).max()),
                                   err_msg=name)  # fmt: skip


@needs_onednn
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,groups", [((4, 7, 9, 16), 1), ((6, 5, 5, 8), 3)])
def test_the_relu_gradient_inside_onednn_is_the_masked_one(shape, groups, dtype, monkeypatch):
    """With the ReLU, the backward primitive masks the output gradient with the forward's bit
    mask: bit for bit what it computes from the gradient XLA has masked with the output, and
    with no masking pass of XLA's left in the compiled step."""
    keys = jax.random.split(jax.random.key(2), 4)
    x = (jax.random.normal(keys[0], shape) * 3 + 2).astype(dtype)
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    dy = jax.random.normal(keys[3], shape).astype(dtype)

    def grads(switch):
        monkeypatch.setenv(onednn.RELU_GRAD_SWITCH, switch)
        forward = lambda *a: onednn.batch_norm(*a, groups, 1e-5, relu=True)[0]  # noqa: E731
        compiled = jax.jit(lambda *a: jax.vjp(forward, *a[:3])[1](a[3])).lower(
            x, scale, bias, dy).compile()  # fmt: skip
        return compiled(x, scale, bias, dy), "select" in compiled.as_text()

    (fused, fused_selects), (masked, masked_selects) = grads("1"), grads("0")
    assert not fused_selects and masked_selects
    assert fused[0].dtype == dtype
    for got, want in zip(fused, masked, strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _norm_targets(compiled):
    """The batch-norm custom calls in a compiled function's HLO, by kernel."""
    text = compiled.as_text()
    own, primitives = onednn._name("own_norm_"), '"' + onednn._name("norm_")
    return {"own": text.count(own), "onednn": text.count(primitives)}


@needs_own_norm
def test_the_own_batch_norm_kernel_takes_channels_in_sixteens(monkeypatch):
    """Channels a multiple of 16 run on csrc/batch_norm.cc (where the CPU has AVX-512), others on
    oneDNN's primitives, and RESNEXT_JAX_OWN_NORM=0 keeps oneDNN's, read when tracing."""

    def targets(channels):
        x, ones = jnp.ones((4, 3, 3, channels)), jnp.ones(channels)
        forward = lambda x: onednn.batch_norm(x, ones, ones, 2, 1e-5, relu=True)[0]  # noqa: E731
        return _norm_targets(jax.jit(jax.grad(lambda x: forward(x).sum())).lower(x).compile())

    assert onednn.own_norm_applies(64) and not onednn.own_norm_applies(24)
    assert targets(32) == {"own": 2, "onednn": 0}
    assert targets(24) == {"own": 0, "onednn": 2}
    monkeypatch.setenv(onednn.OWN_NORM_SWITCH, "0")
    assert not onednn.own_norm_applies(64)
    assert targets(32) == {"own": 0, "onednn": 2}


@needs_own_norm
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["plain", "relu", "add_relu"])
def test_the_own_batch_norm_kernel_matches_onednns(mode, dtype, monkeypatch):
    """The two kernels give the same outputs, statistics and gradients up to their summation
    order (float32) or one rounding of the output (bfloat16), over three groups of images."""
    keys = jax.random.split(jax.random.key(3), 5)
    shape, groups = (6, 7, 5, 32), 3
    x = (jax.random.normal(keys[0], shape) * 3 + 2).astype(dtype)
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    dy = jax.random.normal(keys[3], shape).astype(dtype)
    add = jax.random.normal(keys[4], shape).astype(dtype) if mode == "add_relu" else None

    def run(switch):
        monkeypatch.setenv(onednn.OWN_NORM_SWITCH, switch)
        forward = partial(onednn.batch_norm, groups=groups, epsilon=1e-5, relu=mode != "plain")

        def both(x, scale, bias, add, dy):
            outs, vjp = jax.vjp(lambda *a: forward(*a[:3], add=a[3]), x, scale, bias, add)
            return (*outs, *vjp((dy, jnp.zeros_like(outs[1]), jnp.zeros_like(outs[2]))))

        compiled = jax.jit(both).lower(x, scale, bias, add, dy).compile()
        assert _norm_targets(compiled)["own" if switch == "1" else "onednn"] == 2
        # With the own kernel the ReLU's gradient never takes a pass of XLA's, after a residual
        # add either: its backward writes the masked gradient, which is also the addend's.
        assert ("select" in compiled.as_text()) == (switch == "0" and mode == "add_relu")
        return compiled(x, scale, bias, add, dy)

    names = ("y", "mean", "var", "dx", "dscale", "dbias", "dadd")
    for name, got, want in zip(names, run("1"), run("0"), strict=True):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype, name
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        if dtype == jnp.bfloat16 and mode == "add_relu" and name.startswith("d"):
            # oneDNN rounds the normalized output to bfloat16 before it adds, so near 0 its ReLU
            # mask differs from the own kernel's (which rounds once, after the ReLU): the
            # gradients are compared with float32's in
            # test_bfloat16_batch_norm_matches_float32_on_the_same_inputs instead.
            continue
        if name == "dadd":  # the masked output gradient: exact
            np.testing.assert_array_equal(got, want)
            continue
        rounded = dtype == jnp.bfloat16 and name in ("y", "dx")
        tol = 2.0**-7 if rounded else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()),
                                   err_msg=name)  # fmt: skip


@needs_own_norm
def test_the_own_batch_norm_kernel_is_accurate_far_from_zero():
    """A mean 60 standard deviations from 0, over 8192 rows a channel: the statistics, output
    and input gradient within 1e-6 of a float64 reference (XLA's E[x^2] - E[x]^2 in float32
    is off by about 1e-3 here; the shifted sums and the centered backward avoid that)."""
    rng = np.random.default_rng(0)
    shape = (8, 32, 32, 32)
    x = (rng.standard_normal(shape) * 0.5 + 30).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale, bias = rng.standard_normal((2, 32)).astype(np.float32)
    (y, mean, var), vjp = jax.vjp(lambda x: onednn.batch_norm(x, scale, bias, 1, 1e-5), x)
    (dx,) = vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))
    x64, dy64 = x.astype(np.float64).reshape(-1, 32), dy.astype(np.float64).reshape(-1, 32)
    want_mean, want_var = x64.mean(0), x64.var(0)
    normalized = (x64 - want_mean) / np.sqrt(want_var + 1e-5)
    want_y = normalized * scale + bias
    want_dx = (scale / np.sqrt(want_var + 1e-5)) * (
        dy64 - dy64.mean(0) - normalized * (dy64 * normalized).mean(0)
    )
    for name, got, want in [("mean", mean[0], want_mean), ("var", var[0], want_var),
                            ("y", y, want_y), ("dx", dx, want_dx)]:  # fmt: skip
        got = np.asarray(got, np.float64).reshape(want.shape)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), name


@needs_own_norm
def test_the_own_batch_norm_kernel_keeps_a_nan_and_checks_its_operands():
    x, ones = np.ones((2, 3, 3, 16), np.float32), jnp.ones(16)
    x[1, 2, 2, 5] = np.nan  # a NaN loss must show: the ReLU passes it on, as jax.nn.relu does
    y = onednn.batch_norm(jnp.asarray(x), ones, ones, 1, 1e-5, relu=True)[0]
    assert np.isnan(y[..., 5]).all() and not np.isnan(np.delete(y, 5, axis=-1)).any()
    stats = jax.ShapeDtypeStruct((1, 8), np.float32)
    call = jax.ffi.ffi_call(onednn._name("own_norm_forward"),
                            (jax.ShapeDtypeStruct((2, 3, 3, 8), np.float32), stats, stats,
                             jax.ShapeDtypeStruct((0,), np.uint8)))  # fmt: skip
    with pytest.raises(Exception, match="channels must be a multiple of 16"):
        jax.block_until_ready(call(jnp.ones((2, 3, 3, 8)), jnp.ones(8), jnp.ones(8),
                                   jnp.zeros((0,)), groups=np.int64(1),
                                   epsilon=np.float32(1e-5), mode=np.int64(0)))  # fmt: skip


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 9, 11, 5), (3, 8, 8, 16)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_max_pool_matches_flax(shape, dtype):
    """Distinct inputs (no tied maxima, so the gradients agree too): shuffled bfloat16 bit
    patterns from 1.0 up, exact in either dtype."""
    bits = jax.random.permutation(jax.random.key(0), np.prod(shape)) + 0x3F80
    x = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
    x = x.reshape(shape).astype(dtype)

    def grads(pool):
        y, vjp = jax.vjp(pool, x)
        dy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return y, vjp(dy.astype(dtype))[0]

    want = grads(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    got = grads(lambda x: onednn.max_pool(x, 3, 2, 1))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(got[0], want[0])
    # Where windows overlap, an input's gradient sums up to 4 output gradients: in bfloat16
    # the two round those sums differently.
    tol = 2.0**-5 if dtype == "bfloat16" else 1e-6
    np.testing.assert_allclose(got[1].astype(np.float32), want[1].astype(np.float32), atol=tol)
    with pytest.raises(TypeError, match="float32 or bfloat16.*got float16"):
        onednn.max_pool(x.astype(jnp.float16), 3, 2, 1)


@needs_onednn
def test_a_cpu_without_bfloat16_kernels_casts_to_float32(monkeypatch):
    """Where oneDNN has no bfloat16 kernels (no AVX-512), bfloat16 runs as before: cast to
    float32 around the conv calls, batch norm and pooling in XLA."""
    from resnext_jax.models import resnet

    if "avx512bw" in Path("/proc/cpuinfo").read_text():  # AVX-512 core: oneDNN has bfloat16
        assert onednn.bfloat16_native()
    monkeypatch.setattr(onednn, "bfloat16_native", lambda: False)
    x = jnp.ones((2, 6, 6, 8), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 2, 8), jnp.bfloat16)
    hlo = jax.jit(partial(onednn.grouped_conv, strides=1, padding=1, groups=4)).lower(x, kernel)
    calls = [line for line in hlo.as_text().splitlines() if "custom_call @resnext_onednn" in line]
    assert calls and all("bf16" not in line for line in calls)
    assert not resnet.onednn_dtype(jnp.bfloat16) and resnet.onednn_dtype(jnp.float32)
    with pytest.raises(TypeError, match="no bfloat16 kernels for this CPU"):
        onednn.max_pool(x, 3, 2, 1)


def test_kernel_grad_fold_widens_only_narrow_groups(monkeypatch):
    fold = onednn.kernel_grad_fold
    assert fold(4, 32) == 4  # ResNeXt-50 32x4d, stage 1: groups of 16 channels
    assert fold(2, 32) == 8 and fold(2, 3) == 3
    assert fold(6, 8) == 2 and fold(3, 8) == 4  # the widest that divides the groups
    assert fold(4, 1) == 1 and fold(5, 7) == 1  # nothing to fold into
    assert fold(1, 128) == fold(8, 32) == fold(14, 8) == 1  # depthwise; wide enough
    monkeypatch.setenv(onednn.FOLD_SWITCH, "0")
    assert fold(4, 32) == 1


@needs_onednn
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "x_shape,in_per_group,groups,strides",
    [((2, 9, 11, 128), 4, 32, 1), ((2, 9, 11, 128), 4, 32, 2), ((2, 8, 8, 48), 6, 8, 1),
     ((2, 8, 8, 24), 3, 8, 1), ((2, 8, 8, 64), 2, 32, 2)],
)  # fmt: skip
def test_folded_kernel_grad_is_the_grouped_one(x_shape, in_per_group, groups, strides, dtype):
    """Folded into wider groups, the kernel gradient is computed over more channels, of which
    only the diagonal blocks are kept: the same sums, in at most a different order."""
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], x_shape).astype(dtype)
    kernel_shape = (3, 3, in_per_group, 2 * x_shape[-1])  # 2x: out per group != in
    y_shape = onednn.output_shape(x_shape, kernel_shape, strides, 1)
    dy = jax.random.normal(keys[1], y_shape).astype(dtype)
    args = (kernel_shape, strides, 1, groups)
    fold = onednn.kernel_grad_fold(in_per_group, groups)
    assert fold > 1
    lowered = jax.jit(onednn.folded_kernel_grad, static_argnums=(2, 3, 4, 5)).lower(x, dy, *args)
    assert f"groups = {groups // fold} : i64" in lowered.as_text()
    got, want = lowered.compile()(x, dy), onednn.kernel_grad(x, dy, *args)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    if dtype == jnp.bfloat16:
        assert _ulps_apart(got, want) <= 2
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(abs(want))))


def test_the_narrow_conv_kernel_takes_only_its_shape(monkeypatch):
    applies = onednn.narrow_conv_applies
    f32 = jnp.float32
    if not (onednn.available() and onednn._library.ResnextNarrowConvSupported()):
        assert not applies((3, 3, 4, 128), 1, 1, 32, f32)  # no AVX-512 (or no build): oneDNN's
        return
    assert applies((3, 3, 4, 128), 1, 1, 32, f32)  # ResNeXt-50 32x4d, stage 1
    assert applies((3, 3, 8, 256), 1, 1, 32, f32)  # stage 2
    assert applies((3, 3, 8, 256), 2, 1, 32, f32)  # stage 2's strided first conv
    assert applies((3, 3, 16, 512), 1, 1, 32, f32)  # stage 3
    assert applies((3, 3, 32, 1024), 2, 1, 32, f32)  # stage 4's strided first conv
    passes = onednn.narrow_conv_passes
    assert passes((3, 3, 8, 256), 2, 1, 32, f32) == (True, True, True)
    assert passes((3, 3, 16, 512), 1, 1, 32, f32) == (True, False, False)  # oneDNN's gradients
    assert passes((3, 3, 16, 512), 2, 1, 32, f32) == (True, False, False)
    assert passes((3, 3, 32, 1024), 1, 1, 32, f32) == (True, False, False)
    assert passes((3, 3, 32, 1024), 2, 1, 32, f32) == (True, True, False)
    assert passes((3, 3, 64, 2048), 1, 1, 32, f32) == (False, False, False)
    assert applies((3, 3, 4, 16), 1, 1, 4, f32)
    assert not applies((3, 3, 64, 2048), 1, 1, 32, f32)  # 64 channels a group (32x8d, stage 4)
    assert not applies((3, 3, 8, 256), 3, 1, 32, f32)  # stride 3
    assert not applies((3, 3, 4, 128), 1, 1, 32, jnp.bfloat16)
    assert not applies((3, 3, 4, 8), 1, 1, 2, f32)  # not a multiple of 16 channels
    assert not applies((3, 3, 4, 256), 1, 1, 32, f32)  # 8 outputs a group from 4 inputs
    assert not applies((3, 3, 8, 256), 1, 0, 32, f32)  # no padding
    assert not applies((1, 1, 4, 128), 1, 0, 32, f32)
    monkeypatch.setenv(onednn.NARROW_SWITCH, "0")
    assert not applies((3, 3, 4, 128), 1, 1, 32, f32)


@needs_onednn
@pytest.mark.parametrize("per", [4, 8, 16, 32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [(2, 9, 11, 128), (3, 7, 7, 64), (2, 6, 5, 32), (1, 4, 6, 32), (2, 1, 1, 32), (2, 5, 31, 32)],
)  # widths 11, 7, 5, 6, 1 and 31 (and at stride 2: 6, 4, 3, 3, 1, 16) take each of the
# kernels' partial blocks of pixels, and 31 their full ones; odd and even sizes give a strided
# conv every missing neighbour; 32 channels in groups of 32 leave a thread no group of its own
def test_the_narrow_conv_kernel_matches_xla(shape, stride, per):
    groups = shape[-1] // per
    if not onednn.narrow_conv_applies((3, 3, per, shape[-1]), stride, 1, groups, jnp.float32):
        pytest.skip("this CPU has no AVX-512")
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (3, 3, per, shape[-1]))

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST)  # fmt: skip

    def ours(x, kernel):
        return onednn.grouped_conv(x, kernel, stride, 1, groups)

    dy = jax.random.normal(keys[2], jax.eval_shape(xla, x, kernel).shape)

    def outputs(conv):
        y, vjp = jax.vjp(conv, x, kernel)
        return (y, *vjp(dy))

    # grouped_conv's passes, then the kernel's input gradient wherever oneDNN's runs in them
    _, narrow_dx, narrow_dw = onednn.narrow_conv_passes(kernel.shape, stride, 1, groups, x.dtype)
    lowered = jax.jit(lambda: outputs(ours)).lower().as_text()
    assert "narrow_conv" in lowered
    assert ("narrow_conv_kernel_grad" in lowered) == narrow_dw
    assert ("resnext_onednn_conv" in lowered) == (not narrow_dx or not narrow_dw)
    got = list(jax.jit(lambda: outputs(ours))())
    want = list(jax.jit(lambda: outputs(xla))())
    names = ["y", "dx", "dkernel"]
    if not narrow_dx:
        got.append(jax.jit(lambda: onednn.narrow_conv_input_grad(dy, kernel, x.shape, stride))())
        want.append(want[1])
        names.append("dx by the kernel")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()),
                                   err_msg=name)  # fmt: skip


@needs_onednn
def test_the_narrow_conv_kernel_checks_its_shapes():
    x = jnp.ones((1, 4, 4, 8))
    shape_rule = "3x3xKxC, K 4, 8, 16 or 32, C \\(a multiple of 16 and of K\\)"
    with pytest.raises(Exception, match=shape_rule):
        jax.block_until_ready(onednn.narrow_conv(x, jnp.ones((3, 3, 4, 8))))
    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(Exception, match="3x3xKxC"):
        jax.block_until_ready(onednn.narrow_conv(x, jnp.ones((3, 3, 2, 16))))
    with pytest.raises(Exception, match="stride 1 or 2"):
        jax.block_until_ready(onednn.narrow_conv(x, jnp.ones((3, 3, 4, 16)), stride=3))
    with pytest.raises(Exception, match="output shape does not match the conv"):
        dy = jnp.ones((1, 3, 2, 16))  # a stride-2 conv of 4x4 gives 2x2
        jax.block_until_ready(onednn.narrow_conv_input_grad(dy, jnp.ones((3, 3, 4, 16)),
                                                            x.shape, stride=2))  # fmt: skip
    with pytest.raises(Exception, match="kernel gradient takes K 4 or 8"):
        jax.block_until_ready(onednn.narrow_conv_kernel_grad(x, x, 16))


def test_the_pointwise_matmul_takes_only_its_shape(monkeypatch):
    applies = onednn.pointwise_matmul_applies
    assert applies((16, 14, 14, 512), (1, 1, 512, 1024), 1, 0, 1)  # 3136 positions, 1024 out
    assert applies((16, 28, 28, 256), (1, 1, 256, 512), 1, 0, 1)  # 12544 <= 32 * 512
    assert not applies((16, 28, 28, 512), (1, 1, 512, 256), 1, 0, 1)  # 12544 > 32 * 256
    assert not applies((16, 56, 56, 64), (1, 1, 64, 256), 1, 0, 1)
    assert not applies((16, 14, 14, 512), (1, 1, 512, 1024), 2, 0, 1)  # strided
    assert not applies((16, 14, 14, 512), (3, 3, 512, 512), 1, 1, 1)  # 3x3
    assert not applies((16, 14, 14, 512), (1, 1, 16, 1024), 1, 0, 32)  # grouped
    monkeypatch.setenv(onednn.POINTWISE_SWITCH, "0")
    assert not applies((16, 14, 14, 512), (1, 1, 512, 1024), 1, 0, 1)


@needs_onednn
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shape,out", [((2, 7, 7, 64), 128), ((1, 3, 5, 48), 256), ((4, 2, 2, 16), 16)]
)
def test_the_pointwise_kernel_grad_matches_xla(shape, out, dtype):
    """The 1x1 conv's kernel gradient as one matmul, against XLA's conv gradient: the same
    products, summed in another order."""
    assert onednn.pointwise_matmul_applies(shape, (1, 1, shape[-1], out), 1, 0, 1)
    keys = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(keys[0], shape).astype(dtype)
    kernel = (jax.random.normal(keys[1], (1, 1, shape[-1], out)) * 0.1).astype(dtype)
    dy = jax.random.normal(keys[2], (*shape[:3], out)).astype(dtype)

    def outputs(conv):
        y, vjp = jax.vjp(lambda x, k: conv(x, k, 1, 0, 1), x, kernel)
        return (y, *vjp(dy))

    lowered = jax.jit(lambda: outputs(onednn.grouped_conv)).lower().as_text()
    assert "pointwise_kernel_grad" in lowered and "conv_kernel_grad" not in lowered
    got = jax.jit(lambda: outputs(onednn.grouped_conv))()
    want = jax.jit(lambda: outputs(conv.xla_convs.native))()
    for name, g, w in zip(("y", "dx", "dkernel"), got, want, strict=True):
        assert g.dtype == w.dtype == dtype, name
        if dtype == jnp.bfloat16:
            assert _ulps_apart(g, w) <= 2, name
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()),
                                       err_msg=name)  # fmt: skip


@needs_onednn
def test_the_pointwise_kernel_grad_checks_its_shapes():
    x, dy = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 4, 5, 16))
    with pytest.raises(Exception, match="output shape does not match the conv"):
        jax.block_until_ready(onednn.pointwise_kernel_grad(x, dy))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        onednn.pointwise_kernel_grad(x.astype(jnp.float16), dy.astype(jnp.float16))


@needs_onednn
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("add", [False, True], ids=["no_add", "add"])
@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,groups",
    [((2, 9, 11, 16), (1, 1, 16, 32), 1, 1),  # a bottleneck's 1x1
     ((2, 9, 11, 16), (1, 1, 16, 32), 2, 1),  # a strided projection
     ((2, 9, 11, 16), (3, 3, 16, 24), 2, 1),
     ((2, 8, 8, 12), (3, 3, 3, 12), 1, 4)],  # groups of 3: oneDNN's grouped forward
)  # fmt: skip
def test_conv_affine_is_the_conv_then_the_affine_map_add_and_relu(
    x_shape, kernel_shape, strides, groups, add, relu
):
    """float32: bit for bit oneDNN's own conv followed by y * mul, + shift, + add and the ReLU,
    each rounded to float32; within a rounding of XLA's conv and fused multiply-add; and the
    gradients of that XLA formulation."""
    x, kernel, mul, shift, extra, dy = _affine_operands(x_shape, kernel_shape, strides, add)
    fused, xla = _affine_pair(strides, kernel_shape[0] // 2, groups, relu)
    got = np.asarray(jax.jit(fused)(x, kernel, mul, shift, extra))
    y = np.asarray(onednn.forward(x, kernel, strides, kernel_shape[0] // 2, groups))
    y = y * np.asarray(mul) + np.asarray(shift)
    y = y if extra is None else y + np.asarray(extra)
    np.testing.assert_array_equal(got, np.maximum(y, 0) if relu else y)
    want = np.asarray(jax.jit(xla)(x, kernel, mul, shift, extra))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))

    grads = jax.vjp(fused, x, kernel, mul, shift, extra)[1](dy)
    want_grads = jax.vjp(xla, x, kernel, mul, shift, extra)[1](dy)
    assert (grads[4] is None) == (extra is None)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


@needs_onednn
@pytest.mark.skipif(not onednn.bfloat16_native(), reason="no bfloat16 kernels on this CPU")
@pytest.mark.parametrize("add", [False, True], ids=["no_add", "add"])
@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,groups",
    [((2, 9, 11, 16), (1, 1, 16, 32), 2, 1), ((2, 8, 8, 12), (3, 3, 3, 12), 1, 4)],
)
def test_bfloat16_conv_affine_rounds_once(x_shape, kernel_shape, strides, groups, add):
    """bfloat16: the affine map, add and ReLU run on the float32 accumulator and the output is
    rounded once, so it is the float32 result on the same bfloat16 inputs, rounded (up to the
    summation order); the gradients are those of the layers run apart in bfloat16."""
    bf16 = jnp.bfloat16
    x, kernel, mul, shift, extra, dy = _affine_operands(x_shape, kernel_shape, strides, add, bf16)
    fused, xla = _affine_pair(strides, kernel_shape[0] // 2, groups, True)
    got = jax.jit(fused)(x, kernel, mul, shift, extra)
    assert got.dtype == bf16
    f32 = [None if a is None else a.astype(jnp.float32) for a in (x, kernel, extra)]
    want = jax.jit(fused)(f32[0], f32[1], mul, shift, f32[2])
    assert _ulps_apart(got, want.astype(bf16)) <= 2
    grads = jax.vjp(fused, x, kernel, mul, shift, extra)[1](dy)
    want_grads = jax.vjp(xla, x, kernel, mul, shift, extra)[1](dy)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.linalg.norm(g - w) <= 0.02 * np.linalg.norm(w)


def _affine_operands(x_shape, kernel_shape, strides, add, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 6)
    out = kernel_shape[3]
    y_shape = onednn.output_shape(x_shape, kernel_shape, strides, kernel_shape[0] // 2)
    return (
        jax.random.normal(keys[0], x_shape).astype(dtype),
        (jax.random.normal(keys[1], kernel_shape) * 0.2).astype(dtype),
        jax.random.uniform(keys[2], (out,), minval=0.5, maxval=1.5),
        jax.random.normal(keys[3], (out,)),
        jax.random.normal(keys[4], y_shape).astype(dtype) if add else None,
        jax.random.normal(keys[5], y_shape).astype(dtype),
    )


def _affine_pair(strides, padding, groups, relu):
    """`onednn.conv_affine` and the same function of XLA's conv, computed in float32."""

    def fused(x, kernel, mul, shift, extra):
        return onednn.conv_affine(x, kernel, mul, shift, strides, padding, groups, extra, relu)

    def xla(x, kernel, mul, shift, extra):
        y = conv.xla_convs.native(x, kernel, strides, padding, groups).astype(jnp.float32)
        y = y * mul + shift
        y = y if extra is None else y + extra.astype(jnp.float32)
        return (jnp.where(y > 0, y, 0) if relu else y).astype(x.dtype)

    return fused, xla


@needs_onednn
def test_conv_affine_checks_its_operands():
    x, kernel = jnp.ones((1, 4, 4, 16)), jnp.ones((1, 1, 16, 8))
    with pytest.raises(TypeError, match="one of them"):
        onednn.conv_affine(x.astype(jnp.bfloat16), kernel, jnp.ones(8), jnp.zeros(8), 1, 0)
    with pytest.raises(Exception, match="one value a channel"):
        onednn.conv_affine(x, kernel, jnp.ones(4), jnp.zeros(8), 1, 0).block_until_ready()
    with pytest.raises(Exception, match="the output's shape"):
        onednn.conv_affine(x, kernel, jnp.ones(8), jnp.zeros(8), 1, 0,
                           add=jnp.ones((1, 4, 4, 4))).block_until_ready()  # fmt: skip


def test_conv_affine_leaves_the_narrow_kernels_convs_alone(monkeypatch):
    applies = onednn.conv_affine_applies
    if not onednn.available():
        assert not applies((1, 1, 64, 256), 1, 0, 1)
        return
    assert applies((1, 1, 64, 256), 1, 0, 1)
    assert applies((3, 3, 64, 2048), 1, 1, 32)  # 64 channels a group: oneDNN's forward
    narrow = onednn._library.ResnextNarrowConvSupported()
    assert applies((3, 3, 4, 128), 1, 1, 32) != bool(narrow)  # the narrow kernel's forward
    assert applies((3, 3, 4, 128), 1, 1, 32, jnp.bfloat16)  # which runs float32 only
    monkeypatch.setenv(onednn.AFFINE_SWITCH, "0")
    assert not applies((1, 1, 64, 256), 1, 0, 1)
