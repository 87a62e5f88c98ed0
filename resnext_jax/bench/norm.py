"""Time batch norm (with its ReLU) in jax.numpy and through oneDNN, and print a markdown table.

    python scripts/bench_norm.py
    python scripts/bench_norm.py --shapes 16x56x56x256:g16,128x7x7x256:g32
    python scripts/bench_norm.py --dtype bfloat16

A shape is NxHxWxC[:gGROUP] (GROUP images per batch statistic, as model.bn_group_size; 32 by
default, the whole batch when it holds fewer). Each row times the forward and backward of
`BatchNorm(relu=True)` with XLA's formulation and with resnext_jax.ops.onednn.batch_norm
(this project's own kernel where `onednn.own_norm_applies`, else oneDNN's primitives),
interleaved in one process, in the compute dtype `--dtype` (parameters and statistics
float32), and marks the one `BatchNorm(impl="auto")` picks. Two more columns time auto's with
oneDNN's primitives instead of the own kernel (onednn.OWN_NORM_SWITCH=0), and with the ReLU's
gradient as a separate XLA pass (onednn.RELU_GRAD_SWITCH=0) instead of inside the backward.
docs/benchmarks.md has the tables behind that rule.
"""

import argparse
import os
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp

from resnext_jax.devices import runtime
from resnext_jax.models.resnet import BatchNorm, onednn_batch_norm_pays
from resnext_jax.ops import onednn

# The offline default's batch norms (batch 128 in groups of 32), then ResNet-50's at batch 16.
SHAPES = (
    "128x14x14x32",
    "128x14x14x128",
    "128x7x7x64",
    "128x7x7x256",
    "128x4x4x512",
    "128x14x14x128:g128",
    "16x112x112x64",
    "16x56x56x64",
    "16x56x56x256",
    "16x28x28x512",
    "16x14x14x1024",
    "16x7x7x2048",
)


def parse_shape(spec):
    dims, _, group = spec.partition(":")
    shape = tuple(int(d) for d in dims.split("x"))
    if len(shape) != 4 or (group and not group.startswith("g")):
        raise ValueError(f"bad shape {spec!r}: want NxHxWxC[:gGROUP]")
    return shape, int(group[1:]) if group else 32


def _grad_fn(shape, group, impl, dtype, fused_relu_grad=True, own=True):
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    bn = BatchNorm(group_size=group, impl=impl, relu=True, dtype=dtype)
    variables = bn.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum((y * dy).astype(jnp.float32))

    # Compiled as the trainer compiles its step (resnext_jax.devices.runtime.compiler_options).
    jit = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=runtime.compiler_options())
    args = (variables["params"], x)
    switch = {onednn.RELU_GRAD_SWITCH: "1" if fused_relu_grad else "0",
              onednn.OWN_NORM_SWITCH: "1" if own else "0"}  # fmt: skip
    with mock.patch.dict(os.environ, switch):  # read when tracing: compiled here
        return jit.lower(*args).compile(), args


def bench_shape(spec, reps, dtype=jnp.float32):
    shape, group = parse_shape(spec)
    runs = {impl: _grad_fn(shape, group, impl, dtype) for impl in ("xla", "auto")}
    runs["primitives"] = _grad_fn(shape, group, "auto", dtype, own=False)
    runs["unfused"] = _grad_fn(shape, group, "auto", dtype, fused_relu_grad=False)
    for fn, args in runs.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    times = {impl: [] for impl in runs}
    for _ in range(reps):
        for impl, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[impl].append(time.perf_counter() - start)
    ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    groups = shape[0] // min(group, shape[0])
    pick = "onednn" if onednn_batch_norm_pays(groups, dtype) else "xla"
    cells = [f"{ms['xla']:.2f}" + (" (auto)" if pick == "xla" else ""),
             f"{ms['auto']:.2f}" + (" (auto)" if pick == "onednn" else ""),
             f"{ms['primitives']:.2f}", f"{ms['unfused']:.2f}"]  # fmt: skip
    ratios = (ms["auto"] / ms[other] for other in ("xla", "primitives", "unfused"))
    return f"| {spec} | {groups} | " + " | ".join(cells + [f"{r:.2f}" for r in ratios]) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--reps", type=int, default=9, help="timed runs per cell (median)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if not onednn.available():
        parser.error(f"oneDNN is unavailable: {onednn.unavailable_reason()}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {runtime.allocator()}, "
          f"{runtime.xla_cpu_fusions()}, {args.dtype}, fwd+bwd ms (median)")  # fmt: skip
    print("| shape | groups | xla ms | onednn ms | oneDNN's primitives ms | ReLU grad in XLA ms "
          "| onednn / xla | onednn / primitives | onednn / ReLU grad in XLA |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        print(bench_shape(spec, args.reps, jnp.dtype(args.dtype)), flush=True)
