"""The oneDNN custom calls: built where they should be, clear errors where they cannot be."""

import os
import platform
import subprocess
import sys

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


@pytest.mark.skipif(onednn._compiler() is None, reason="no C++ compiler")
def test_a_failed_build_shows_the_compiler_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE, str(tmp_path / "cache"))
    prefix = _fake_prefix(tmp_path / "prefix")
    monkeypatch.setattr(onednn, "find_onednn", lambda: (prefix / "include", prefix / "lib"))
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    with pytest.raises(onednn.OnednnUnavailable, match="building broken.cc failed"):
        onednn.build()
    assert not list((tmp_path / "cache").rglob("*.so"))


@pytest.mark.slow
@needs_onednn
def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn.CACHE, str(tmp_path))
    path = onednn.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert onednn.build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    changed = tmp_path / "changed.cc"
    changed.write_text(onednn.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(onednn, "SOURCE", changed)
    assert onednn.build() != path


def test_the_onednn_impl_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(onednn, "_load", lambda: "no oneDNN on this machine")
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
    call = jax.ffi.ffi_call(onednn._name("forward"), jax.ShapeDtypeStruct((2, 7, 8, 16), "f4"))
    with pytest.raises(Exception, match="output shape does not match"):
        jax.block_until_ready(
            call(x, kernel, stride=np.int64(1), padding=np.int64(1), groups=np.int64(4))
        )
    with pytest.raises(Exception, match="kernel does not match the groups"):
        jax.block_until_ready(onednn.forward(x, kernel, 1, 1, 2))
    with pytest.raises(TypeError, match="float32"):
        onednn.forward(x.astype(jnp.bfloat16), kernel, 1, 1, 4)


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
