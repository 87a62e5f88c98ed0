"""Start-up of the entry points: run under tcmalloc where it is installed.

XLA's CPU runtime allocates its buffers afresh at every step. glibc's malloc serves blocks
above 32 MiB with mmap and unmaps them on free, so every training step faults in its whole
working set again as new zeroed pages: writing a 51 MB result into a fresh buffer took
14 ms against 2.4 ms into a reused one on this project's 2-core CPU. tcmalloc keeps freed
pages and reuses them, which made ResNet-50's and ResNeXt-50's training steps 1.3x faster
there (docs/benchmarks.md). glibc's own tunables (no mmap, no trim; transparent huge pages)
fixed the isolated case but not the training step.

`use_tcmalloc()` re-executes the script with tcmalloc in LD_PRELOAD when Debian's
`libtcmalloc-minimal4` (or another copy of libtcmalloc_minimal.so.4) is installed;
`RESNEXT_JAX_TCMALLOC=0` turns it off. Child processes inherit the setting.
"""

import os
import sys

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
