"""Time each grouped-conv implementation and print a markdown table.

    python scripts/bench_grouped_conv.py --shapes resnext50 --impls shift,matmul,dense
    python scripts/bench_grouped_conv.py --shapes 16x56x56x128:g32:k3:s1 --parts
    python scripts/bench_grouped_conv.py --shapes resnet50_1x1 --impls pointwise --parts

A shape is NxHxWxWIDTH[:gGROUPS][:kK][:sSTRIDE][:oOUT] (a WIDTH->OUT conv, OUT = WIDTH
unless given, padding K//2). Every row is timed interleaved with the dense (groups=1) conv
of the same widths, in one process. `pointwise` (the dense 1x1 path) is timed on k1 g1
shapes only.
Columns: forward; input grad (dx) and kernel grad (dw) alone (--parts); fwd+bwd of the conv
alone; "block": fwd+bwd with a scale+ReLU before and after, as in a ResNeXt block, which is
what a network sees (XLA fuses neighbours into the conv's ops); the ratio is of "block" to
the dense conv's. "(auto)" marks the impl `select_impl` picks, "(xla_auto)" its pick among
the XLA formulations where that differs (`auto` without oneDNN). Where `onednn` folds the
kernel gradient of narrow groups (resnext_jax.ops.onednn.kernel_grad_fold), a row
"onednn, dw unfolded" times oneDNN's kernels without folding, side by side; where it runs the
project's own narrow-group kernel (onednn.narrow_conv_applies) or a 1x1 kernel gradient as a
matmul (onednn.pointwise_matmul_applies), a row "onednn, oneDNN's kernels" times oneDNN's
conv primitives instead.
"""

import argparse
import os
import statistics
import time
from functools import partial
from unittest import mock

import jax
import jax.numpy as jnp

from resnext_jax.devices import runtime
from resnext_jax.ops import conv as conv_ops
from resnext_jax.ops import onednn

# The 3x3 grouped convs of ResNeXt-50 32x4d at batch 16, 224 px: stage by stage, the
# stride-2 conv is the first block's of stages 2-4.
RESNEXT50 = (
    "16x56x56x128:g32:s1",
    "16x56x56x256:g32:s2",
    "16x28x28x256:g32:s1",
    "16x28x28x512:g32:s2",
    "16x14x14x512:g32:s1",
    "16x14x14x1024:g32:s2",
    "16x7x7x1024:g32:s1",
)
# The same convs for the other Table 3 settings at depth 50 (2x40d, 4x24d, 8x14d).
TABLE3 = tuple(
    f"16x{size}x{size}x{width * scale}:g{groups}:s{stride}"
    for groups, width in ((2, 80), (4, 96), (8, 112))
    for size, scale, stride in (
        (56, 1, 1),
        (56, 2, 2),
        (28, 2, 1),
        (28, 4, 2),
        (14, 4, 1),
        (14, 8, 2),
        (7, 8, 1),
    )
)
# Fashion-MNIST / CIFAR-sized ResNeXts at batch 128, and the depthwise extreme.
SMALL = (
    "128x28x28x64:g8:s1",
    "128x28x28x128:g8:s2",
    "128x14x14x128:g8:s1",
    "128x7x7x256:g8:s1",
    "128x32x32x32:g4:s1",
    "128x32x32x128:g32:s1",
    "128x16x16x256:g16:s1",
    "128x32x32x64:g2:s1",
    "128x32x32x64:g64:s1",
)
# The 1x1 convs of ResNet-50 at batch 16, 224 px (ResNeXt-50's are the same at twice the
# inner width): reduce, expand and the stride-2 projections of stages 2-4.
RESNET50_1X1 = (
    "16x56x56x64:k1:o64",
    "16x56x56x64:k1:o256",
    "16x56x56x256:k1:o64",
    "16x56x56x256:k1:o128",
    "16x56x56x256:k1:s2:o512",
    "16x28x28x128:k1:o512",
    "16x28x28x512:k1:o128",
    "16x14x14x256:k1:o1024",
    "16x14x14x1024:k1:o256",
    "16x7x7x512:k1:o2048",
    "16x7x7x2048:k1:o512",
)
# The other dense convs of ResNet-50 at batch 16, 224 px: the 7x7 stem, then each stage's 3x3
# (the stride-2 one is the first block's of stages 2-4).
RESNET50_KXK = (
    "16x224x224x3:k7:s2:o64",
    "16x56x56x64",
    "16x56x56x128:s2",
    "16x28x28x128",
    "16x28x28x256:s2",
    "16x14x14x256",
    "16x14x14x512:s2",
    "16x7x7x512",
)
SHAPE_SETS = {
    "resnext50": RESNEXT50,
    "resnet50_kxk": RESNET50_KXK,
    "table3": TABLE3,
    "small": SMALL,
    "resnet50_1x1": RESNET50_1X1,
}


# The row of `onednn` with its kernel gradient computed at the groups' own width (and oneDNN's
# conv primitives where the project's own narrow-group kernel would run).
UNFOLDED = "onednn, dw unfolded"
# The row of `onednn` with oneDNN's conv primitives where the project's narrow-group kernel or
# the 1x1 kernel gradient's matmul would run.
ONEDNN_KERNELS = "onednn, oneDNN's kernels"


def parse_shape(spec):
    """(x_shape, kernel_size, strides, groups, out) from NxHxWxWIDTH[:gG][:kK][:sS][:oO]."""
    dims, *opts = spec.split(":")
    fields = {"g": 1, "k": 3, "s": 1, "o": 0}
    for opt in opts:
        if opt[:1] not in fields:
            raise ValueError(f"bad shape option {opt!r} in {spec!r}; use gN, kN, sN or oN")
        fields[opt[0]] = int(opt[1:])
    x_shape = tuple(int(d) for d in dims.split("x"))
    if len(x_shape) != 4:
        raise ValueError(f"bad shape {spec!r}: want NxHxWxWIDTH")
    return x_shape, fields["k"], fields["s"], fields["g"], fields["o"] or x_shape[-1]


def timed_functions(impl, x_shape, k, strides, groups, out, dtype, fold=True, own_kernels=True):
    """Compiled fwd, input grad, kernel grad, and fwd+bwd of one conv, with their arguments;
    with `fold=False`, `onednn`'s kernel gradient is not folded (onednn.kernel_grad_fold), and
    with `own_kernels=False` oneDNN's conv primitives run where the narrow-group kernel or the
    pointwise matmul would (onednn.narrow_conv_applies, onednn.pointwise_matmul_applies)."""
    width = x_shape[-1]
    x = jax.random.normal(jax.random.key(0), x_shape, dtype)
    kernel = jax.random.normal(jax.random.key(1), (k, k, width // groups, out), dtype) * 0.05
    # Not jitted of its own: JAX would reuse its trace across the switches below.
    fwd = partial(conv_ops.conv2d, strides=strides, padding=k // 2, groups=groups, impl=impl)
    # A random cotangent passed as an argument: a constant one lets XLA fold the backward.
    dy = jax.random.normal(jax.random.key(2), jax.eval_shape(fwd, x, kernel).shape, dtype)

    def vjp(x, w, dy, argnums, with_output=False):
        y, pullback = jax.vjp(fwd, x, w)
        grads = tuple(pullback(dy)[i] for i in argnums)  # XLA drops what is not returned
        return (y, *grads) if with_output else grads

    def block(x, w, dy):
        """fwd+bwd between ReLUs, as in a ResNeXt block; XLA fuses differently than alone."""
        scale = jnp.full(x.shape[-1:], 1.1, x.dtype)

        def f(x, scale, w):
            y = fwd(jax.nn.relu(x * scale + 0.1), w)
            return jnp.vdot(jax.nn.relu(y * 1.1 - 0.1), dy).astype(jnp.float32)

        return jax.value_and_grad(f, (0, 1, 2))(x, scale, w)

    # Compiled as the trainer compiles its step (resnext_jax.devices.runtime.compiler_options).
    jit = partial(jax.jit, compiler_options=runtime.compiler_options())
    fns = {
        "fwd": jit(lambda x, w, dy: fwd(x, w)),
        "dx": jit(partial(vjp, argnums=(0,))),
        "dw": jit(partial(vjp, argnums=(1,))),
        "fwd+bwd": jit(partial(vjp, argnums=(0, 1), with_output=True)),
        "block": jit(block),
    }
    # The switches are read when tracing: compile now, under them.
    own = "1" if own_kernels else "0"
    switches = {onednn.FOLD_SWITCH: "1" if fold else "0", onednn.NARROW_SWITCH: own,
                onednn.POINTWISE_SWITCH: own}  # fmt: skip
    with mock.patch.dict(os.environ, switches):
        fns = {mode: fn.lower(x, kernel, dy).compile() for mode, fn in fns.items()}
    return fns, (x, kernel, dy)


def median_ms(runs, modes, reps) -> dict:
    """{(name, mode): median ms} of `runs` ({name: (fns, args)} as `timed_functions` returns),
    compiled and warmed up first, then timed interleaved `reps` times."""
    for fns, args in runs.values():  # compile and warm up
        for mode in modes:
            jax.block_until_ready(fns[mode](*args))
    times = {(name, mode): [] for name in runs for mode in modes}
    for _ in range(reps):  # interleaved, so load from other processes hits every row alike
        for name, (fns, args) in runs.items():
            for mode in modes:
                start = time.perf_counter()
                jax.block_until_ready(fns[mode](*args))
                times[name, mode].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}


def time_stacks(stacks, reps, dtype=jnp.float32, modes=("fwd", "fwd+bwd")) -> dict:
    """{name: {mode: ms}} of stacks of conv layers ({name: [(impl, x_shape, k, groups, out)]}),
    each layer timed alone (stride 1) and the medians summed over a stack, side by side."""
    runs = {
        (name, i): timed_functions(impl, x_shape, k, 1, groups, out, dtype)
        for name, stack in stacks.items()
        for i, (impl, x_shape, k, groups, out) in enumerate(stack)
    }
    ms = median_ms(runs, modes, reps)
    return {
        name: {m: sum(ms[(name, i), m] for i in range(len(stack))) for m in modes}
        for name, stack in stacks.items()
    }


def bench_shape(spec, impls, parts, reps, dtype):
    x_shape, k, strides, groups, out = parse_shape(spec)
    modes = ["fwd", "dx", "dw", "fwd+bwd", "block"] if parts else ["fwd", "fwd+bwd", "block"]
    if (k, groups) != (1, 1):
        impls = [i for i in impls if i != "pointwise"]
    runs = {"dense C=1": timed_functions("xla", x_shape, k, strides, 1, out, dtype)}
    runs.update({i: timed_functions(i, x_shape, k, strides, groups, out, dtype) for i in impls})
    onednn_args = ("onednn", x_shape, k, strides, groups, out, dtype)
    kernel = (k, k, x_shape[-1] // groups, out)
    own = onednn.narrow_conv_applies(kernel, strides, k // 2, groups, dtype)
    own |= onednn.pointwise_matmul_applies(x_shape, kernel, strides, k // 2, groups)
    if "onednn" in impls and own:
        runs[ONEDNN_KERNELS] = timed_functions(*onednn_args, own_kernels=False)
    if "onednn" in impls and onednn.kernel_grad_fold(x_shape[-1] // groups, groups) > 1:
        runs[UNFOLDED] = timed_functions(*onednn_args, fold=False, own_kernels=False)
    ms = median_ms(runs, modes, reps)
    auto = conv_ops.select_impl(x_shape, kernel, strides, groups)
    xla_auto = conv_ops.select_impl(x_shape, kernel, strides, groups, use_onednn=False)
    rows = []
    for name in runs:
        cells = [f"{ms[name, m]:.1f}" for m in modes]
        ratio = ms[name, "block"] / ms["dense C=1", "block"]
        mark = " (auto)" if name == auto else " (xla_auto)" if name == xla_auto else ""
        rows.append(f"| {spec} | {name}{mark} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return modes, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default="resnext50",
        help=f"comma-separated shape specs or sets {sorted(SHAPE_SETS)}",
    )
    parser.add_argument(
        "--impls",
        default=",".join(conv_ops.IMPLS),
        help="comma-separated IMPLS keys, or pointwise (dense 1x1 shapes); by default all, "
        "less onednn where it is not built",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time the input grad (dx) and kernel grad (dw) alone",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    specs = []
    for item in args.shapes.split(","):
        specs.extend(SHAPE_SETS.get(item, (item,)))
    impls = args.impls.split(",")
    known = [*conv_ops.IMPLS, "pointwise"]
    unknown = [i for i in impls if i not in known]
    if unknown:
        parser.error(f"unknown impls {unknown}; choose from {known}")
    if "onednn" in impls and not onednn.available():
        reason = f"onednn is unavailable: {onednn.unavailable_reason()}"
        if args.impls != parser.get_default("impls"):
            parser.error(reason)
        print(f"({reason}; left out)")
        impls.remove("onednn")

    on_cpu = jax.default_backend() == "cpu"
    fusions = f"{runtime.xla_cpu_fusions()}, " if on_cpu else ""
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {runtime.allocator()}, "
        f"{fusions}{args.dtype}, ms (median)"
    )
    header = None
    for spec in specs:
        modes, rows = bench_shape(spec, impls, args.parts, args.reps, jnp.dtype(args.dtype))
        if header is None:
            header = ["shape", "impl", *(f"{m} ms" for m in modes), "block / dense C=1"]
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
        print("\n".join(rows), flush=True)
