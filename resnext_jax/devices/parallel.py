"""Data parallelism: the device mesh, per-device steps, and joining a multi-process run.

Every compiled step (training, evaluation, the benchmark's) runs as one program per device:
`jax.shard_map` over the mesh's single axis `data`, each device on its own rows of the global
batch, the state replicated. The reductions are written out in the step (`pmean` of the
gradients, BN statistics and metrics; `psum` of the eval sums; both below, and left out over
one device), so the compiled step moves nothing across devices but those. Plain `jax.jit`
with a batch-sharded input leaves the split to XLA's SPMD partitioner, which all-gathers the
whole batch in front of every grouped conv (openxla/xla#47945) and cannot split a custom call
(the oneDNN convs) at all: every device would compute every image's grouped convs.

`collectives` and `flops` read a compiled step, for the tests and the benchmark that check
the above. `process_sum` adds up a host-side count over processes. `initialize` joins a
multi-process run (`scripts/train.py --distributed`).
"""

import collections
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnext_jax.devices import runtime

DATA_AXIS = "data"

# HLO opcodes that move data between devices; an async pair counts once (its "-start").
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "collective-broadcast",
)
_COLLECTIVE_RE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh over `devices` (default: every device of every process)."""
    return Mesh(np.array(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def process_sum(value: int) -> int:
    """`value` summed over all processes; every process must call this at the same point."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def per_device(fn, mesh, in_specs, out_specs, donate_argnums=()):
    """`fn` compiled as one program per device of `mesh`, with the project's XLA options.

    `fn` sees each device's block of the arguments whose spec is `P(DATA_AXIS)` and the whole
    of those whose spec is `P()`; it must reduce over `DATA_AXIS` whatever it returns as `P()`.
    """
    # Over one device a reduction over DATA_AXIS is the identity, yet XLA CPU keeps a written
    # one, as a copy of the whole gradient (docs/benchmarks.md, "Several devices"). `pmean`
    # and `psum` below leave it out there; the values' device variance then goes unchecked,
    # since no reduction turns per-device values into the replicated ones `P()` promises.
    single = mesh.size == 1
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=not single),
        donate_argnums=donate_argnums,
        compiler_options=runtime.compiler_options(),
    )


def axis_devices(axis_name) -> int:
    """How many devices the mesh axis `axis_name` spans (inside shard_map); 1 for no axis."""
    return jax.lax.axis_size(axis_name) if axis_name else 1


def spans_devices(axis_name) -> bool:
    """Whether `axis_name` names a mesh axis of more than one device (inside shard_map)."""
    return axis_devices(axis_name) > 1


def pmean(tree, axis_name):
    """`lax.pmean` of `tree` over `axis_name`; `tree` itself where that is no axis or one
    device (`per_device`)."""
    return jax.lax.pmean(tree, axis_name) if spans_devices(axis_name) else tree


def psum(tree, axis_name):
    """`lax.psum` of `tree` over `axis_name`; `tree` itself where that is no axis or one
    device (`per_device`)."""
    return jax.lax.psum(tree, axis_name) if spans_devices(axis_name) else tree


def varying_axes(x) -> frozenset:
    """The mesh axes over which `x` differs between devices (inside shard_map; else none)."""
    return jax.typeof(x).manual_axis_type.varying


def vary_like(x, *likes):
    """`x` typed as differing over every mesh axis that one of `likes` differs over.

    Inside shard_map a value built from constants (a loop's initial carry, a custom call's
    operand) is typed as the same on every device; an op that combines it with per-device
    values, or a custom rule that must return their type, needs it typed as theirs.
    """
    axes = frozenset().union(*map(varying_axes, likes)) - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def collective_ops(compiled) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Each cross-device op in a compiled program: (opcode, the shapes it returns)."""
    found = []
    for match in _COLLECTIVE_RE.finditer(compiled.as_text()):
        shapes = [
            tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE_RE.findall(match[1])
        ]
        found.append((match[2], shapes))
    return found


def collectives(compiled) -> dict[str, int]:
    """Opcode -> count of the cross-device ops in a compiled program."""
    return dict(collections.Counter(op for op, _ in collective_ops(compiled)))


def flops(compiled) -> float:
    """XLA's cost analysis of a compiled program: floating-point ops per device per call.

    Custom calls (the oneDNN convs) count zero, on any number of devices alike.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jaxlibs: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


# What `jax.distributed.initialize()` is told where neither flags nor a cluster say it.
ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator_address="", num_processes=0, process_id=-1, environ=None) -> None:
    """Join a multi-process run, before any JAX computation.

    The coordinator (`host:port` of process 0), the process count and this process's id come
    from the arguments, else from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, else from JAX's cluster detection (Cloud TPU, SLURM, Open MPI, ...).
    Collectives between processes on CPU go through gloo.
    """
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENVIRONMENT[0], "")
    count = num_processes or _env_int(environ, ENVIRONMENT[1], 0)
    index = process_id if process_id >= 0 else _env_int(environ, ENVIRONMENT[2], -1)
    given = {"coordinator address": bool(address), "process count": count > 0,
             "process id": index >= 0}  # fmt: skip
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given.values()):
        if not index < count:
            raise ValueError(f"process id {index} is not below the process count {count}")
        jax.distributed.initialize(address, count, index)
        return
    if any(given.values()):
        missing = ", ".join(k for k, v in given.items() if not v)
        raise ValueError(
            f"--distributed without a {missing}: give all three of --coordinator_address, "
            f"--num_processes and --process_id (or {', '.join(ENVIRONMENT)}), or none of them "
            "inside a cluster that JAX detects"
        )
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        raise ValueError(
            f"--distributed found no cluster to join ({e}). Outside Cloud TPU, SLURM or MPI, "
            "start every process with --coordinator_address=HOST:PORT (process 0's), "
            "--num_processes=N and --process_id=I (or the variables "
            f"{', '.join(ENVIRONMENT)})"
        ) from e


def _env_int(environ, name, default) -> int:
    value = environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
