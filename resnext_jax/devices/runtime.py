"""How this project runs on XLA CPU: tcmalloc for the entry points, no YNNPACK fusions.

XLA's CPU runtime allocates its buffers afresh at every step. glibc's malloc serves large
blocks with mmap and unmaps them on free, so every training step faults in its whole working
set again as new zeroed pages; tcmalloc keeps freed pages and reuses them.
`use_tcmalloc()` re-executes the script with tcmalloc in LD_PRELOAD when Debian's
`libtcmalloc-minimal4` (or another copy of libtcmalloc_minimal.so.4) is installed;
`RESNEXT_JAX_TCMALLOC=0` turns it off. Child processes inherit the setting.

`compiler_options()` is what every compiled training, evaluation and benchmark step passes to
`jax.jit`: on CPU it turns off XLA's YNNPACK fusions, which jaxlib 0.10 hands convolutions,
dots and reductions to by default and which ran far slower inside a whole training step
than alone. `RESNEXT_JAX_YNN=1` keeps XLA's default.

`steps_in_flight()` is how many training steps the trainer and the benchmark let run ahead of
the host: one on CPU, where XLA allocates a step's buffers when the step is dispatched, so a
step queued behind another holds a second set of them while it waits.

docs/benchmarks.md ("The whole training step on XLA CPU: dense 1x1 convs and the allocator",
"XLA CPU's YNNPACK fusions", "CPU training beside torchvision") has the measurements behind
these rules.
"""

import ctypes
import functools
import os
import sys
import time

LIBRARY = "libtcmalloc_minimal.so.4"
SEARCH_PATH = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
OFF_SWITCH = "RESNEXT_JAX_TCMALLOC"


def tcmalloc_path(search_path=SEARCH_PATH) -> str | None:
    """The installed tcmalloc library, or None."""
    for folder in search_path:
        path = os.path.join(folder, LIBRARY)
        if os.path.exists(path):
            return path
    return None


def allocator() -> str:
    """The allocator this process runs with, in words (for benchmark headers and logs)."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"


def use_tcmalloc(search_path=SEARCH_PATH, execv=os.execv) -> None:
    """Re-execute this process under tcmalloc, unless it already is, has none, or is told not to.

    Call it first thing under `if __name__ == "__main__":`, never on import: it replaces the
    process (same pid, arguments and interpreter flags).
    """
    if os.environ.get(OFF_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return
    path = tcmalloc_path(search_path)
    if allocator() == "tcmalloc" or path is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    os.environ["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    sys.stdout.flush()
    sys.stderr.flush()
    execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


YNN_SWITCH = "RESNEXT_JAX_YNN"
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict:
    """XLA options for this project's jitted steps: top-level `jax.jit(f, compiler_options=...)`.

    On CPU, no YNNPACK fusions (see the module docstring), where this jaxlib knows the option
    and `RESNEXT_JAX_YNN` is not 1; elsewhere nothing. The answer is cached at the first
    call: set `RESNEXT_JAX_YNN` before it.
    """
    import jax
    import numpy as np

    if os.environ.get(YNN_SWITCH, "0") == "1" or jax.default_backend() != "cpu":
        return {}
    try:  # a jaxlib without the option refuses it at compile time
        jax.jit(lambda x: x + 1, compiler_options=NO_YNN).lower(np.float32(0)).compile()
    except Exception:  # JaxRuntimeError here; any refusal means "compile with defaults"
        return {}
    return dict(NO_YNN)


def xla_cpu_fusions() -> str:
    """Which fusions XLA CPU compiles with here, in words (for benchmark headers)."""
    return "XLA CPU without YNNPACK fusions" if compiler_options() else "XLA's default fusions"


def steps_in_flight(platform: str | None = None) -> int:
    """Training steps dispatched ahead of the host: 1 on CPU, 2 on accelerators.

    XLA's CPU runtime allocates a step's temporary buffers when it is dispatched; a second step
    queued behind a running one would hold its own set while it waits, nearly doubling the
    resident memory of a step. A CPU step is long next to the host's dispatch of the next one,
    so waiting for it first costs nothing measurable there. Accelerators keep two queued so
    their queue never runs dry.
    """
    import jax

    return 1 if (platform or jax.default_backend()) == "cpu" else 2


def _tcmalloc_allocated():
    """A function returning the bytes tcmalloc has handed out, or None without tcmalloc."""
    try:
        get = ctypes.CDLL(None).MallocExtension_GetNumericProperty
    except (OSError, AttributeError):  # not preloaded
        return None
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    value = ctypes.c_size_t()

    def allocated() -> int:
        get(b"generic.current_allocated_bytes", ctypes.byref(value))
        return value.value

    return allocated


class StepGate:
    """Dispatch steps (training or evaluation) one at a time on CPU, each after the last one's
    buffers are freed.

    `wait(outputs)` before dispatching a step blocks until the previous step's outputs exist
    (steps_in_flight; None before the first step). On CPU it then also waits, under tcmalloc,
    for that step's temporary buffers to be freed: XLA marks the outputs ready a moment before
    it frees them, and a step dispatched in that moment finds its predecessor's block still
    taken, so tcmalloc maps a second one. Both then stay resident, doubling the step's memory
    for the rest of the run (docs/benchmarks.md, "CPU training beside torchvision"). The wait
    ends once the bytes tcmalloc has handed out fall back toward where they were when the
    previous step was dispatched, or after `patience` seconds; it is skipped when they grew by
    less than `threshold` bytes (a small step, or one whose buffers were already freed).
    """

    def __init__(self, platform=None, threshold=16 << 20, patience=0.02):
        self.one_at_a_time = steps_in_flight(platform) == 1
        self.allocated = _tcmalloc_allocated() if self.one_at_a_time else None
        self.threshold, self.patience = threshold, patience
        self.before = None  # bytes handed out when the previous step was dispatched

    def wait(self, outputs) -> None:
        if not self.one_at_a_time:
            return
        import jax

        jax.block_until_ready(outputs)
        if self.allocated is None:
            return
        grown = self.allocated() - self.before if self.before is not None else 0
        if grown > self.threshold:
            target = self.before + grown // 2
            deadline = time.monotonic() + self.patience
            while self.allocated() > target and time.monotonic() < deadline:
                time.sleep(1e-4)
        self.before = self.allocated()
