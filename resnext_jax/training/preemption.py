"""SIGTERM as a request to save and stop: the one guard the trainer and the sweep runner share.

A preemptible machine gets SIGTERM some seconds before it goes away. Inside `with
Preemption(...)` the signal only sets `requested` (and calls `on_signal`, which the sweep
runner uses to pass the signal on to the run in progress); the code that holds the guard
decides where to stop. Outside the main thread no handler is installed, as for any library
code.

With several processes (`mesh` given and `jax.process_count() > 1`), a process that stopped
alone would leave the others waiting in the next collective, and a signal often reaches only
one of them. So `poll()` casts each process's request into a vote, a max over the mesh
dispatched behind the step like its metrics and read one step later: every process reads the
same outcome after the same step and stops there.
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.devices import parallel


class Preemption:
    """Context manager: SIGTERM sets `requested`; `poll()` says when to stop, on every process."""

    def __init__(self, mesh=None, on_signal=None):
        self.requested = False
        self._on_signal = on_signal
        self._previous = None
        self._ballot = None  # the vote in flight
        self._vote = None
        if mesh is not None and jax.process_count() > 1:
            self._mesh = mesh
            self._vote = jax.jit(jnp.max, out_shardings=parallel.replicated(mesh))

    def poll(self) -> bool:
        """Once per step, after dispatching it: whether to save and stop after this step."""
        if self._vote is None:
            return self.requested
        ballot, flags = self._ballot, np.full(len(self._mesh.local_devices), self.requested)
        self._ballot = self._vote(
            jax.make_array_from_process_local_data(parallel.data_sharded(self._mesh), flags)
        )
        return ballot is not None and bool(ballot)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self._on_signal is not None:
            self._on_signal()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
