"""oneDNN's kernels on CPU, called from XLA as FFI custom calls: convs, batch norm, max pooling.

XLA CPU has no fast kernel for narrow-group convolutions, runs its dense convs and batch-norm
reductions slower than oneDNN, the library PyTorch's CPU layers run on (docs/benchmarks.md).
`csrc/` wraps oneDNN's primitives as XLA FFI handlers that read this project's NHWC
activations in place: `onednn_conv.cc` the conv, its input gradient and its kernel gradient
(the flax kernel layout read through a strided view, any groups), and a 1x1 conv's kernel
gradient as one matmul (`pointwise_matmul_applies`); `onednn_norm.cc` the
training-mode batch norm over groups of images, optionally followed by a ReLU or by a residual
add and a ReLU, and its backward; `onednn_pool.cc` max pooling and its backward. Beside them,
`narrow_conv.cc` is this project's own AVX-512 kernel for the 3x3 convs, stride 1 or 2, of
4- to 32-channel groups, where oneDNN's is slow (`narrow_conv_passes`), and `batch_norm.cc` its
own training-mode batch norm, which `batch_norm` runs instead of oneDNN's where
`own_norm_applies`.

The wrapper is compiled on first use with the system C++ compiler (`$CXX`, a command line such
as `ccache g++`, else `c++`) against the oneDNN headers and library that requirements.txt
installs into the environment (`onednn-devel-cpu-gomp`, `onednn-cpu-gomp`; `/usr` and
`/usr/local` are searched too, for Debian's `libdnnl-dev`), within `$RESNEXT_JAX_BUILD_TIMEOUT`
seconds. The library lands in `$RESNEXT_JAX_CACHE` (default `~/.cache/resnext_jax`), named by a
hash of the sources and the build inputs, so a changed source or environment builds afresh and
concurrent processes never see a half-written file. Loading a library runs its code, so the
cache and the library must be the user's own and writable by no one else (a shared cache under
/tmp is refused).
`scripts/setup.sh` builds it once. Where anything is missing (another OS or CPU, no compiler,
no oneDNN) `available()` is False, `unavailable_reason()` says why, and `auto` keeps to the
XLA formulations; `RESNEXT_JAX_ONEDNN=0` turns the path off.

`grouped_conv` (any groups, dense ones too), `batch_norm` and `max_pool` are differentiable
functions built on the calls, on CPU only; `grouped_conv` computes the kernel gradient of
narrow groups over folded, wider ones (`kernel_grad_fold`). Each runs float32 or bfloat16 as
it is: bfloat16 activations, kernels and gradients stay bfloat16 in memory and oneDNN
accumulates in float32, with AVX512-BF16 and AMX instructions where the CPU has them
(`bfloat16_native()`: a CPU without AVX-512 has no bfloat16 kernels, and bfloat16 is cast to
float32 there); the conv casts any other dtype to float32. The calls are opaque to XLA: its
cost analysis counts no FLOPs for them (`resnext_jax.models.inspector.xla_flops` compiles with
XLA's own layers for that reason), and its sharding propagation cannot split them, so they
run only inside per-device steps (resnext_jax/devices/parallel.py). Scratch memory comes from
per-thread buffers that calls reuse (csrc/onednn_common.h) and workspaces are outputs XLA
allocates: allocated on every call, they fragmented the heap.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.devices import parallel

CSRC = Path(__file__).with_name("csrc")
# The translation units of the one library, and what they include.
SOURCES = (
    CSRC / "onednn_conv.cc",
    CSRC / "onednn_norm.cc",
    CSRC / "onednn_pool.cc",
    CSRC / "narrow_conv.cc",
    CSRC / "batch_norm.cc",
)
HEADERS = (CSRC / "onednn_common.h",)
SWITCH = "RESNEXT_JAX_ONEDNN"
FOLD_SWITCH = "RESNEXT_JAX_ONEDNN_FOLD"  # 0: no folded kernel gradients (kernel_grad_fold)
# 0: batch_norm's ReLU gradient as a separate XLA pass instead of inside oneDNN's backward
RELU_GRAD_SWITCH = "RESNEXT_JAX_ONEDNN_NORM_RELU"
NARROW_SWITCH = "RESNEXT_JAX_NARROW_CONV"  # 0: oneDNN for the convs narrow_conv_applies to
OWN_NORM_SWITCH = "RESNEXT_JAX_OWN_NORM"  # 0: oneDNN's batch norm where own_norm_applies
# Channels a group (in and out) csrc/narrow_conv.cc computes the forward and input gradient
# of, and of those the kernel gradient.
NARROW_WIDTHS = (4, 8, 16, 32)
NARROW_KERNEL_GRAD_WIDTHS = (4, 8)
# 0: oneDNN's conv primitive for the kernel gradients pointwise_matmul_applies to
POINTWISE_SWITCH = "RESNEXT_JAX_ONEDNN_MATMUL_DW"
CACHE = "RESNEXT_JAX_CACHE"
BUILD_TIMEOUT = "RESNEXT_JAX_BUILD_TIMEOUT"  # seconds
DEFAULT_BUILD_TIMEOUT = 600  # generous: it is there to stop a hung compiler, not a slow one
TARGETS = {
    "conv_forward": "ResnextOnednnConvForward",
    "conv_affine": "ResnextOnednnConvForwardAffine",
    "conv_input_grad": "ResnextOnednnConvInputGrad",
    "conv_kernel_grad": "ResnextOnednnConvKernelGrad",
    "norm_forward": "ResnextOnednnNormForward",
    "norm_backward": "ResnextOnednnNormBackward",
    "own_norm_forward": "ResnextNormForward",
    "own_norm_backward": "ResnextNormBackward",
    "pool_forward": "ResnextOnednnPoolForward",
    "pool_backward": "ResnextOnednnPoolBackward",
    "narrow_conv": "ResnextNarrowConv",
    "narrow_conv_kernel_grad": "ResnextNarrowConvKernelGrad",
    "pointwise_kernel_grad": "ResnextOnednnPointwiseKernelGrad",
}
# OpenMP: narrow_conv.cc's threads, from the same libgomp as oneDNN's.
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fopenmp"]
# jaxlib's FFI headers trip two harmless GCC warnings; keep a build log readable.
QUIET = ["-Wno-attributes", "-Wno-return-type"]
HEADER = Path("include", "oneapi", "dnnl", "dnnl.hpp")
LIB_DIRS = ("lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu")


class OnednnUnavailable(RuntimeError):
    """The oneDNN path cannot run here; the message says why and what to do."""


def find_onednn(prefixes=None) -> tuple[Path, Path] | None:
    """(include dir, library dir) of the first oneDNN install with both headers and library."""
    prefixes = prefixes or (sys.prefix, "/usr/local", "/usr")
    for prefix in map(Path, prefixes):
        if not (prefix / HEADER).exists():
            continue
        for lib in LIB_DIRS:
            if (prefix / lib / "libdnnl.so").exists():
                return prefix / "include", prefix / lib
    return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE) or Path.home() / ".cache" / "resnext_jax")


def _compiler() -> list[str] | None:
    """`$CXX` (else `c++`) as a command line, its first word resolved on PATH; None if absent."""
    try:
        words = shlex.split(os.environ.get("CXX") or "c++")
    except ValueError:  # unbalanced quotes
        return None
    program = shutil.which(words[0]) if words else None
    return [program, *words[1:]] if program else None


def _build_timeout() -> float:
    value = os.environ.get(BUILD_TIMEOUT) or str(DEFAULT_BUILD_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if not 0 < seconds < float("inf"):
        raise OnednnUnavailable(
            f"{BUILD_TIMEOUT} must be a positive number of seconds, not {value!r}"
        )
    return seconds


def _check_private(path: Path) -> None:
    """Refuse a cache entry that another user owns or can write: loading it would run their code."""
    info = path.stat()
    if info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    elif info.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.filemode(info.st_mode)})"
    else:
        return
    raise OnednnUnavailable(
        f"refusing the build cache's {path}: it {problem}, so a library there could be another "
        f"user's code; point {CACHE} at a directory of your own, or, if {path} is meant to be "
        f"yours alone, make it so: chown $USER {path}; chmod go-w {path}"
    )


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the compiler; on a timeout (or an interrupt) end it and all it started."""
    # Its own process group, so that a hung cc1plus under `g++` or `ccache` dies with it.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _compile(command: list[str], path: Path) -> None:
    """Compile into `path`, atomically: another process sees no file or the whole library."""
    timeout = _build_timeout()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp, path.name)
        try:
            done = _run([*command, "-o", str(partial)], timeout)
        except subprocess.TimeoutExpired:
            raise OnednnUnavailable(
                f"building {_names()} took over {timeout:g} s and was stopped "
                f"({shlex.join(command)}); check the compiler, or allow it longer with "
                f"{BUILD_TIMEOUT}=<seconds>"
            ) from None
        if done.returncode:
            raise OnednnUnavailable(
                f"building {_names()} failed ({shlex.join(command)}):\n{done.stderr[-2000:]}"
            )
        os.chmod(partial, 0o755)  # whatever the umask: _check_private refuses a writable one
        os.replace(partial, path)


def _names() -> str:
    return " and ".join(source.name for source in SOURCES)


def build() -> Path:
    """Compile the wrapper (if not already in the cache) and return the library's path."""
    found = find_onednn()
    if found is None:
        raise OnednnUnavailable(
            "oneDNN's headers and libdnnl.so were not found under "
            f"{sys.prefix}, /usr/local or /usr; install onednn-cpu-gomp and "
            "onednn-devel-cpu-gomp (requirements.txt) or Debian's libdnnl-dev"
        )
    compiler = _compiler()
    if compiler is None:
        cxx = os.environ.get("CXX") or "c++"
        raise OnednnUnavailable(
            f"no C++ compiler: {cxx!r} ($CXX, else c++) is not a command on PATH; "
            "install g++ (Debian: g++) or set CXX"
        )
    include, lib = found
    command = [
        *compiler,
        *FLAGS,
        *QUIET,
        *map(str, SOURCES),
        f"-I{CSRC}",
        f"-I{include}",
        f"-I{jax.ffi.include_dir()}",
        f"-L{lib}",
        "-ldnnl",
        f"-Wl,-rpath,{lib.resolve()}",
    ]
    key = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        key.update(source.read_bytes())
    key.update(" ".join(command).encode())
    key.update((lib / "libdnnl.so").resolve().name.encode())
    key.update(jax.__version__.encode())
    cache = cache_dir()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(cache)
    path = cache / f"onednn_ops-{key.hexdigest()[:16]}.so"
    if path.exists():
        _check_private(path)
        return path
    _compile(command, path)
    return path


_library = None  # the loaded wrapper, once _load() succeeded


@functools.cache
def _load() -> str | None:
    """Build, load and register the FFI targets once per process; the reason if that failed."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"turned off by {SWITCH}=0"
    if not sys.platform.startswith("linux"):
        return f"built only on Linux here, not {sys.platform}"
    global _library
    try:
        library = ctypes.CDLL(str(build()))
    except (OnednnUnavailable, OSError) as e:
        return str(e)
    workspace_bytes = library.ResnextOnednnNormWorkspaceBytes
    workspace_bytes.restype = ctypes.c_int64
    workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_int64] * 2
    library.ResnextOnednnPoolWorkspaceBytes.restype = ctypes.c_int64
    library.ResnextOnednnPoolWorkspaceBytes.argtypes = [ctypes.c_int64] * 8
    library.ResnextOnednnBfloat16Supported.restype = ctypes.c_int
    library.ResnextNarrowConvSupported.restype = ctypes.c_int
    library.ResnextNormSupported.restype = ctypes.c_int
    _library = library
    for target, symbol in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(_name(target), capsule, platform="cpu")
    return None


def _name(target: str) -> str:
    return f"resnext_onednn_{target}"


def available() -> bool:
    """Whether the `onednn` impl can run in this process (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def require() -> None:
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(
            f"the onednn conv impl is unavailable: {reason}. Pick another impl "
            "(--config.model.conv_impl=auto) or fix the cause."
        )


NATIVE = (np.dtype(np.float32), np.dtype(jnp.bfloat16))  # what the calls can read and write


@functools.cache
def bfloat16_native() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU: it needs AVX-512 (and uses AVX512-BF16 and AMX
    where the CPU has them). Elsewhere bfloat16 models cast to float32 around the calls."""
    return available() and bool(_library.ResnextOnednnBfloat16Supported())


def native_dtypes() -> tuple:
    """The dtypes the calls run as they are on this CPU (NATIVE, or float32 alone)."""
    return NATIVE if bfloat16_native() else NATIVE[:1]


def _check_dtypes(what, *arrays):
    """Raise unless `arrays` share one dtype of `native_dtypes()`; return it."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1 or not dtypes <= set(NATIVE):
        got = " and ".join(sorted(map(str, dtypes)))
        raise TypeError(f"the onednn {what} runs float32 or bfloat16 (one of them), got {got}")
    if not dtypes <= set(native_dtypes()):
        raise TypeError(f"the onednn {what}: oneDNN has no bfloat16 kernels for this CPU "
                        "(they need AVX-512); cast to float32")  # fmt: skip
    return dtypes.pop()


def _call(target, out_shape, a, b, strides, padding, groups):
    require()
    dtype = _check_dtypes("conv impl", a, b)
    a, b = parallel.vary_like(a, b), parallel.vary_like(b, a)  # one type for both operands
    # The result is typed like the operands, so that inside a per-device step (shard_map) it
    # varies over the same mesh axes: typed as replicated, autodiff would sum its cotangents
    # over the devices.
    result = jax.typeof(a).update(shape=tuple(out_shape), dtype=dtype)
    call = jax.ffi.ffi_call(_name(target), result, vmap_method="sequential")
    return call(a, b, stride=np.int64(strides), padding=np.int64(padding), groups=np.int64(groups))


def output_shape(x_shape, kernel_shape, strides, padding):
    n, h, w, _ = x_shape
    kh, kw, _, out = kernel_shape
    return (n, (h + 2 * padding - kh) // strides + 1, (w + 2 * padding - kw) // strides + 1, out)


def forward(x, kernel, strides, padding, groups):
    shape = output_shape(x.shape, kernel.shape, strides, padding)
    return _call("conv_forward", shape, x, kernel, strides, padding, groups)


AFFINE_SWITCH = "RESNEXT_JAX_ONEDNN_AFFINE"  # 0: inference batch norms as XLA passes


def conv_affine_applies(kernel_shape, strides, padding, groups, dtype=np.float32) -> bool:
    """Whether `conv_affine` runs this conv in `dtype`: wherever oneDNN's forward primitive
    would (`narrow_conv_passes` leaves it there; the narrow kernel's convs keep their own
    forward), unless `RESNEXT_JAX_ONEDNN_AFFINE=0`, read when a step is traced."""
    return (
        os.environ.get(AFFINE_SWITCH, "1") != "0"
        and available()
        and not narrow_conv_passes(kernel_shape, strides, padding, groups, dtype)[0]
    )


def conv_affine(x, kernel, mul, shift, strides, padding, groups=1, add=None, relu=False):
    """relu(conv(x, kernel) * mul + shift + add) (`add` and the ReLU optional), an inference
    batch norm after a conv, in one oneDNN call: the affine map, the add and the ReLU run as
    post-ops on each output tile while it is in registers, so none makes a pass over memory.
    `x`, `kernel` and `add` float32 or bfloat16 (one of them); `mul` and `shift` hold one value
    an output channel, in float32. In float32, `x * mul + shift` rounds twice where XLA's fused
    multiply-add rounds once. In bfloat16 the post-ops run on the float32 accumulator and the
    output is rounded to bfloat16 once, where the layers run apart round the conv's output, the
    normalized value and the sum each. The gradient recomputes the conv (`grouped_conv`) and
    differentiates the same expression in jax.numpy."""
    require()
    operands = (x, kernel) if add is None else (x, kernel, add)
    _check_dtypes("conv affine", *operands)
    mul, shift = jnp.asarray(mul, jnp.float32), jnp.asarray(shift, jnp.float32)
    return _conv_affine(x, kernel, mul, shift, add, strides, padding, groups, bool(relu))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _conv_affine(x, kernel, mul, shift, add, strides, padding, groups, relu):
    every = (x, kernel, mul, shift) + (() if add is None else (add,))
    x, kernel, mul, shift = (parallel.vary_like(a, *every) for a in (x, kernel, mul, shift))
    extra = () if add is None else (parallel.vary_like(add, *every),)
    shape = output_shape(x.shape, kernel.shape, strides, padding)
    call = jax.ffi.ffi_call(_name("conv_affine"), jax.typeof(x).update(shape=shape),
                            vmap_method="sequential")  # fmt: skip
    return call(x, kernel, mul, shift, *extra, stride=np.int64(strides),
                padding=np.int64(padding), groups=np.int64(groups), relu=relu)  # fmt: skip


def _conv_affine_unfused(x, kernel, mul, shift, add, strides, padding, groups, relu):
    y = grouped_conv(x, kernel, strides, padding, groups).astype(jnp.float32) * mul + shift
    y = y if add is None else y + add.astype(jnp.float32)
    y = jnp.where(y > 0, y, 0) if relu else y  # the gradient at 0 is 0, as ops.activation's
    return y.astype(x.dtype)


def _conv_affine_fwd(x, kernel, mul, shift, add, strides, padding, groups, relu):
    y = _conv_affine(x, kernel, mul, shift, add, strides, padding, groups, relu)
    return y, (x, kernel, mul, shift, add)


def _conv_affine_bwd(strides, padding, groups, relu, residuals, dy):
    x, kernel, mul, shift, add = residuals
    unfused = partial(_conv_affine_unfused, strides=strides, padding=padding, groups=groups,
                      relu=relu)  # fmt: skip
    _, pullback = jax.vjp(unfused, x, kernel, mul, shift, add)
    return pullback(dy)


_conv_affine.defvjp(_conv_affine_fwd, _conv_affine_bwd)


def input_grad(dy, kernel, x_shape, strides, padding, groups):
    return _call("conv_input_grad", x_shape, dy, kernel, strides, padding, groups)


def kernel_grad(x, dy, kernel_shape, strides, padding, groups):
    return _call("conv_kernel_grad", kernel_shape, x, dy, strides, padding, groups)


if __name__ == "__main__":  # `python -m resnext_jax.ops.onednn`: build now, say where or why not
    reason = _load()
    print(f"onednn conv: {'unavailable: ' + reason if reason else build()}")
    sys.exit(0)


def grouped_conv(x, kernel, strides, padding, groups):
    """oneDNN's conv and its two gradients as XLA FFI custom calls (or, where
    `narrow_conv_passes` says, csrc/narrow_conv.cc's).

    float32 and bfloat16 run as they are (the result and the gradients in the operands' dtype,
    accumulated in float32); other dtypes are cast to float32 and back.
    """
    t = _compute_dtype(x, kernel)
    # Decided here, outside the differentiable function, whose trace JAX caches: the switches
    # are read on every call.
    narrow = narrow_conv_passes(kernel.shape, strides, padding, groups, t)
    matmul_dw = pointwise_matmul_applies(x.shape, kernel.shape, strides, padding, groups)
    return _grouped_conv(x, kernel, strides, padding, groups, narrow, matmul_dw)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _grouped_conv(x, kernel, strides, padding, groups, narrow, matmul_dw):
    t = _compute_dtype(x, kernel)
    if narrow[0]:
        return narrow_conv(x.astype(t), kernel.astype(t), strides).astype(x.dtype)
    y = forward(x.astype(t), kernel.astype(t), strides, padding, groups)
    return y.astype(x.dtype)


def narrow_conv_applies(kernel_shape, strides, padding, groups, dtype) -> bool:
    """Whether `grouped_conv` runs this conv's forward on this project's own kernel
    (csrc/narrow_conv.cc) instead of oneDNN's, and its gradients where `narrow_conv_passes` says:
    a 3x3 conv, stride 1 or 2, padding 1, of 4, 8, 16 or 32 input channels a group and as many
    outputs (the four stages of ResNeXt 32x4d and 64x4d, the first three of 32x8d), channels a
    multiple of 16, in float32, on a CPU with AVX-512. oneDNN 3.2's forward for such groups took
    1.2-2.1x its time per conv at ResNeXt-50's first two stages and 1.35x at its third
    (docs/benchmarks.md, "A narrow-group conv kernel of our own", "8-channel groups and stride
    2", "16- and 32-channel groups").
    `RESNEXT_JAX_NARROW_CONV=0`, read when a step is traced, keeps oneDNN's.
    """
    kh, kw, cin, out = kernel_shape
    return (
        (kh, kw, padding) == (3, 3, 1)
        and strides in (1, 2)
        and cin in NARROW_WIDTHS
        and out == cin * groups
        and out % 16 == 0
        and np.dtype(dtype) == np.float32
        and os.environ.get(NARROW_SWITCH, "1") != "0"
        and available()
        and bool(_library.ResnextNarrowConvSupported())
    )


def narrow_conv_passes(kernel_shape, strides, padding, groups, dtype) -> tuple[bool, bool, bool]:
    """Which of a conv's forward, input gradient and kernel gradient `grouped_conv` runs on
    csrc/narrow_conv.cc: none unless `narrow_conv_applies`; else the forward, and both gradients
    at 4 and 8 channels a group. At 16 and 32, where the kernel's forward is the faster one,
    oneDNN's gradients took as long as the kernel's or less in ResNeXt-50's training step, except
    the input gradient of a stride-2 conv of 32-channel groups (1.9x oneDNN's speed); that one
    runs on the kernel (docs/benchmarks.md, "16- and 32-channel groups").
    """
    if not narrow_conv_applies(kernel_shape, strides, padding, groups, dtype):
        return False, False, False
    grads = kernel_shape[2] in NARROW_KERNEL_GRAD_WIDTHS
    return True, grads or (strides, kernel_shape[2]) == (2, 32), grads


# A stride-1 1x1 conv's kernel gradient runs as a matmul where it sums over at most this many
# positions per output channel.
POINTWISE_POSITIONS_PER_OUTPUT = 32


def pointwise_matmul_applies(x_shape, kernel_shape, strides, padding, groups) -> bool:
    """Whether `grouped_conv` computes its kernel gradient as one oneDNN matmul
    (`pointwise_kernel_grad`) instead of oneDNN's convolution_backward_weights: a dense 1x1
    conv, stride 1, no padding, whose n*h*w positions are at most
    POINTWISE_POSITIONS_PER_OUTPUT per output channel (at batch 16 and 224 px, ResNet-50's and
    ResNeXt-50's 1x1 convs from the 28x28 stage's widening ones on). There oneDNN 3.2's
    primitive, with the reorder of its blocked result, took up to 1.5x the matmul's time
    (docs/benchmarks.md, "1x1 kernel gradients as a matmul").
    `RESNEXT_JAX_ONEDNN_MATMUL_DW=0`, read when a step is traced, keeps the conv primitive.
    """
    n, h, w, _ = x_shape
    kh, kw, _, out = kernel_shape
    return (
        (kh, kw, strides, padding, groups) == (1, 1, 1, 0, 1)
        and n * h * w <= POINTWISE_POSITIONS_PER_OUTPUT * out
        and os.environ.get(POINTWISE_SWITCH, "1") != "0"
    )


def pointwise_kernel_grad(x, dy):
    """The (1, 1, c, out) kernel gradient of a stride-1 1x1 conv of NHWC `x` (c channels) with
    output gradient `dy` (out channels), as one oneDNN matmul (x's positions transposed, in
    place, times dy's); float32 or bfloat16, the operands' type."""
    require()
    dtype = _check_dtypes("pointwise kernel grad", x, dy)
    x, dy = parallel.vary_like(x, dy), parallel.vary_like(dy, x)
    result = jax.typeof(x).update(shape=(1, 1, x.shape[-1], dy.shape[-1]), dtype=dtype)
    call = jax.ffi.ffi_call(_name("pointwise_kernel_grad"), result, vmap_method="sequential")
    return call(x, dy)


def narrow_conv(x, kernel, stride=1):
    """csrc/narrow_conv.cc's conv of float32 NHWC `x` with a 3x3xKxC kernel (groups of K = 4, 8,
    16 or 32 channels, stride 1 or 2, padding 1); `narrow_conv_passes` says where it runs."""
    require()
    x, kernel = parallel.vary_like(x, kernel), parallel.vary_like(kernel, x)
    result = jax.typeof(x).update(shape=output_shape(x.shape, kernel.shape, stride, 1))
    call = jax.ffi.ffi_call(_name("narrow_conv"), result, vmap_method="sequential")
    return call(x, kernel, stride=np.int64(stride), transposed=False)


def narrow_conv_input_grad(dy, kernel, x_shape, stride=1):
    """The input gradient (`x_shape`) of `narrow_conv` from its output gradient `dy` and its
    kernel, by csrc/narrow_conv.cc: the conv of `dy` with `narrow_input_grad_kernel(kernel)`,
    its pixels two apart on the input's grid where the conv's stride is 2."""
    require()
    dy, kernel = parallel.vary_like(dy, kernel), parallel.vary_like(kernel, dy)
    call = jax.ffi.ffi_call(_name("narrow_conv"), jax.typeof(dy).update(shape=tuple(x_shape)),
                            vmap_method="sequential")  # fmt: skip
    return call(dy, narrow_input_grad_kernel(kernel), stride=np.int64(stride), transposed=True)


def narrow_conv_kernel_grad(x, dy, per, stride=1):
    """The kernel gradient (3x3x`per`xC) of `narrow_conv` from its input `x` and output gradient
    `dy`, by csrc/narrow_conv.cc; `per` one of NARROW_KERNEL_GRAD_WIDTHS."""
    require()
    x, dy = parallel.vary_like(x, dy), parallel.vary_like(dy, x)
    result = jax.typeof(x).update(shape=(3, 3, per, x.shape[-1]))
    call = jax.ffi.ffi_call(_name("narrow_conv_kernel_grad"), result, vmap_method="sequential")
    return call(x, dy, stride=np.int64(stride))


def narrow_input_grad_kernel(kernel):
    """The kernel whose stride-1 `narrow_conv` of a grouped conv's output gradient is its input
    gradient: flipped in space, and each group's inputs and outputs swapped."""
    kh, kw, per, out = kernel.shape
    blocks = kernel.reshape(kh, kw, per, out // per, per)[::-1, ::-1]  # tap, in, group, out
    return blocks.transpose(0, 1, 4, 3, 2).reshape(kh, kw, per, out)


def _compute_dtype(*arrays):
    """The dtype oneDNN runs `arrays` in: theirs if they share one it runs natively here
    (`native_dtypes()`), else float32."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    native = set(native_dtypes())
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= native else np.dtype(np.float32)


def _grouped_conv_fwd(x, kernel, strides, padding, groups, narrow, matmul_dw):
    return _grouped_conv(x, kernel, strides, padding, groups, narrow, matmul_dw), (x, kernel)


def _grouped_conv_bwd(strides, padding, groups, narrow, matmul_dw, residuals, dy):
    x, kernel = residuals
    t = _compute_dtype(x, kernel)
    xt, kt, dyt = x.astype(t), kernel.astype(t), dy.astype(t)
    _, narrow_dx, narrow_dw = narrow
    if narrow_dx:
        dx = narrow_conv_input_grad(dyt, kt, x.shape, strides)
    else:
        dx = input_grad(dyt, kt, x.shape, strides, padding, groups)
    if narrow_dw:
        dw = narrow_conv_kernel_grad(xt, dyt, kernel.shape[2], strides)
    elif matmul_dw:
        dw = pointwise_kernel_grad(xt, dyt)
    else:
        dw = folded_kernel_grad(xt, dyt, kernel.shape, strides, padding, groups)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


# The widest group `folded_kernel_grad` computes a narrow group's kernel gradient in.
FOLD_WIDTH = 16


def kernel_grad_fold(in_per_group: int, groups: int) -> int:
    """How many neighbouring groups `folded_kernel_grad` computes as one: 1 (no folding) unless
    a group has 2 to 7 input channels; then the most groups, dividing `groups`, whose inputs
    fit in FOLD_WIDTH channels.

    oneDNN 3.2's kernel-gradient primitive is slower at 2-7 channels a group than at 16 over
    the same activations, with several times the arithmetic. At one channel a group
    (depthwise) it has a fast kernel of its own, and at 8 the gain was mixed
    (docs/benchmarks.md, "Narrow groups' kernel gradient, folded").
    `RESNEXT_JAX_ONEDNN_FOLD=0`, read when a step is traced, turns folding off.
    """
    if not 2 <= in_per_group < 8 or os.environ.get(FOLD_SWITCH, "1") == "0":
        return 1
    fits = [k for k in range(1, groups + 1) if groups % k == 0 and in_per_group * k <= FOLD_WIDTH]
    return max(fits)


def folded_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
    """The kernel gradient of a grouped conv, computed over groups `kernel_grad_fold` wide.

    A conv with groups/k groups of k times the channels is the grouped conv with a
    block-diagonal kernel: its kernel gradient holds the grouped conv's in its k diagonal
    blocks (each output's own group's inputs) and, off them, sums the grouped conv never uses.
    Only the summation order can differ from `kernel_grad`'s.
    """
    kh, kw, cin, out = kernel_shape
    k = kernel_grad_fold(cin, groups)
    if k == 1:
        return kernel_grad(x, dy, kernel_shape, strides, padding, groups)
    wide = kernel_grad(x, dy, (kh, kw, k * cin, out), strides, padding, groups // k)
    # Input channel j*cin + i of a wide group, output s*k*per + j'*per + c: kept where j == j'.
    per = out // groups
    blocks = wide.reshape(kh, kw, k, cin, groups // k, k, per)
    diagonal = jnp.diagonal(blocks, axis1=2, axis2=5)  # (kh, kw, cin, groups/k, per, k)
    return jnp.moveaxis(diagonal, -1, -2).reshape(kernel_shape)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def _norm_operands(activations, params):
    """`activations` (float32 or bfloat16, one dtype) and float32 `params`, checked, all typed
    to vary like the first activation."""
    require()
    _check_dtypes("batch norm", *activations)
    if any(p.dtype != np.float32 for p in params):
        got = ", ".join(str(p.dtype) for p in params)
        raise TypeError(
            f"the onednn batch norm's scale, bias and statistics are float32, not {got}"
        )
    x = activations[0]
    return [x, *(parallel.vary_like(a, x) for a in (*activations[1:], *params))]


def _typed(like, shape, dtype=np.float32):
    """An FFI result typed like `like` (varying over its mesh axes), of `shape` and `dtype`."""
    return jax.typeof(like).update(shape=tuple(shape), dtype=np.dtype(dtype))


# What the forward applies after normalizing (the C++ side's `Mode`).
PLAIN, RELU, ADD_RELU = 0, 1, 2


def _is_bfloat16(dtype) -> int:
    return int(np.dtype(dtype) == np.dtype(jnp.bfloat16))


def _workspace_bytes(x_shape, dtype, groups, epsilon, mode) -> int:
    """Bytes of the workspace the forward writes in `mode` for one group of images."""
    n, h, w, c = x_shape
    size = _library.ResnextOnednnNormWorkspaceBytes(
        n // groups, h, w, c, epsilon, mode, _is_bfloat16(dtype)
    )
    if size < 0:
        raise OnednnUnavailable(f"oneDNN has no {dtype} batch norm in mode {mode} for {x_shape}")
    return size


def own_norm_applies(channels: int) -> bool:
    """Whether `batch_norm` runs on this project's own kernel (csrc/batch_norm.cc) instead of
    oneDNN's primitives: channels a multiple of 16, on a CPU with AVX-512 (F, BW and VL).
    oneDNN 3.2's batch norm took about twice torch's time on the same tensors; this one makes
    torch's passes over memory and applies the residual add in its output pass
    (docs/benchmarks.md, "Batch norm, a kernel of our own"). `RESNEXT_JAX_OWN_NORM=0`, read
    when a step is traced, keeps oneDNN's.
    """
    return (
        channels % 16 == 0
        and os.environ.get(OWN_NORM_SWITCH, "1") != "0"
        and available()
        and bool(_library.ResnextNormSupported())
    )


def _norm_forward(x, scale, bias, add, groups, epsilon, relu):
    """(y, mean, var, workspace, own): `own` whether the own kernel ran, `workspace` its ReLU
    bits (one bit an element, where a ReLU follows) or oneDNN's workspace."""
    mode = ADD_RELU if add is not None else RELU if relu else PLAIN
    own = own_norm_applies(x.shape[-1])
    if add is None:
        add = jnp.zeros((0,), x.dtype)  # the call's addend slot, empty
    x, add, scale, bias = _norm_operands((x, add), (scale, bias))
    stats = _typed(x, (groups, x.shape[-1]))
    if own:
        size = 0 if mode == PLAIN else x.size // 8
    else:  # an output XLA allocates (and frees) with the step's buffers
        size = groups * _workspace_bytes(x.shape, x.dtype, groups, epsilon, mode)
    workspace = _typed(x, (size,), np.uint8)
    call = jax.ffi.ffi_call(
        _name("own_norm_forward" if own else "norm_forward"),
        (_typed(x, x.shape, x.dtype), stats, stats, workspace),
        vmap_method="sequential",
    )
    outs = call(x, scale, bias, add, groups=np.int64(groups), epsilon=np.float32(epsilon),
                mode=np.int64(mode))  # fmt: skip
    return (*outs, own)


def relu_grad_fused() -> bool:
    """Whether batch_norm's backward applies its ReLU's gradient inside its kernel, from the
    bit mask its forward wrote (RELU_GRAD_SWITCH, read when a step is traced)."""
    return os.environ.get(RELU_GRAD_SWITCH, "1") != "0"


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _batch_norm(x, scale, bias, add, groups, epsilon, relu):
    return _norm_forward(x, scale, bias, add, groups, epsilon, relu)[:3]


def _batch_norm_fwd(x, scale, bias, add, groups, epsilon, relu):
    y, mean, var, workspace, own = _norm_forward(x, scale, bias, add, groups, epsilon, relu)
    # The statistics are kept as a copy, for the backward only. The ReLU's gradient is applied
    # by the backward kernel from the forward's bit mask (1/32 of a float32 output), or else by
    # an XLA pass masking with the output, which the next layer keeps anyway. After the
    # residual add, oneDNN's path always takes the latter (its backward cannot write the masked
    # gradient, which is also the addend's); the own kernel writes it.
    stats = jnp.stack([mean, var])
    relu = relu or add is not None
    fused = relu and (add is None or own) and relu_grad_fused()
    mask = y if relu and not fused else None
    # Leafless markers: static, unlike bools.
    added = () if add is not None else None
    own = () if own else None
    return (y, mean, var), (x, scale, stats, mask, workspace if fused else None, added, own)


def _batch_norm_bwd(groups, epsilon, relu, residuals, cotangents):
    x, scale, stats, y, workspace, added, own = residuals
    added, own = added is not None, own is not None
    dy = cotangents[0]  # the statistics' cotangents are zero: batch_norm stops their gradient
    if y is not None:
        dy = jnp.where(y > 0, dy, 0)  # jax.nn.relu's gradient: 0 where the input was <= 0
    x, dy, scale, stats = _norm_operands((x, dy), (scale, stats))
    fused = workspace is not None
    workspace = parallel.vary_like(workspace if fused else jnp.zeros((0,), np.uint8), x)
    param = _typed(x, scale.shape)
    attrs = dict(groups=np.int64(groups), epsilon=np.float32(epsilon))
    if own:
        # The masked dy (the addend's gradient) overwrites dy after a residual add; else dx does.
        masked = added and fused
        call = jax.ffi.ffi_call(
            _name("own_norm_backward"),
            (_typed(x, x.shape, x.dtype), param, param,
             _typed(x, x.shape if masked else (0,), x.dtype)),
            vmap_method="sequential",
            input_output_aliases={1: 3} if masked else None if added else {1: 0},
        )  # fmt: skip
        dx, dscale, dbias, dadd = call(x, dy, scale, stats, workspace, **attrs)
        return dx, dscale, dbias, (dadd if masked else dy) if added else None
    # dx overwrites dy (oneDNN's backward runs in place) unless the addend's gradient needs it.
    call = jax.ffi.ffi_call(
        _name("norm_backward"),
        (_typed(x, x.shape, x.dtype), param, param),
        vmap_method="sequential",
        input_output_aliases=None if added else {1: 0},
    )
    dx, dscale, dbias = call(x, dy, scale, stats, workspace, **attrs, relu=np.int64(fused))
    return dx, dscale, dbias, dy if added else None


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x, scale, bias, groups: int, epsilon: float, relu: bool = False, add=None):
    """Training-mode batch norm of NHWC `x` over `groups` groups of images, on this project's
    own kernel where `own_norm_applies`, else on oneDNN's primitives.

    `x` (and `add`) float32 or bfloat16, `scale` and `bias` float32; both kernels compute in
    float32 and write the output in x's dtype. Returns (y, mean, var): the output, and each
    group's mean and biased variance as float32 (groups, channels) arrays. With `relu` the
    output is ReLU'd in the same pass; with `add` (x-shaped) it is relu(batch_norm(x) + add), a
    residual block's end. The output is differentiable in x, scale, bias and add (the kernel's
    backward); the statistics are returned under stop_gradient, for the running averages.
    """
    y, mean, var = _batch_norm(x, scale, bias, add, groups, epsilon, bool(relu))
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def _pool_forward(x, window, strides, padding):
    require()
    _check_dtypes("max pool", x)
    n, h, w, c = x.shape
    shape = output_shape(x.shape, (window, window, c, c), strides, padding)
    size = _library.ResnextOnednnPoolWorkspaceBytes(
        n, h, w, c, window, strides, padding, _is_bfloat16(x.dtype)
    )
    if size < 0:
        raise OnednnUnavailable(f"oneDNN has no {x.dtype} max pooling for {x.shape}")
    workspace = _typed(x, (size,), np.uint8)
    call = jax.ffi.ffi_call(
        _name("pool_forward"), (_typed(x, shape, x.dtype), workspace), vmap_method="sequential"
    )
    return call(x, window=np.int64(window), stride=np.int64(strides), padding=np.int64(padding))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, strides: int, padding: int):
    """oneDNN's max pooling of NHWC `x` (float32 or bfloat16): square `window`, symmetric
    `padding` that never wins. Its gradient goes to the maximum oneDNN recorded in each window;
    where a window holds equal maxima that may be another one than XLA's select-and-scatter
    picks."""
    return _pool_forward(x, window, strides, padding)[0]


def _max_pool_fwd(x, window, strides, padding):
    y, workspace = _pool_forward(x, window, strides, padding)
    # x only for its shape: it is kept anyway (the ReLU before the pool masks its gradient with it).
    return y, (workspace, x)


def _max_pool_bwd(window, strides, padding, residuals, dy):
    workspace, x = residuals
    workspace = parallel.vary_like(workspace, dy)
    result = _typed(dy, x.shape, dy.dtype)
    call = jax.ffi.ffi_call(_name("pool_backward"), result, vmap_method="sequential")
    dx = call(dy, workspace, window=np.int64(window), stride=np.int64(strides),
              padding=np.int64(padding))  # fmt: skip
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
