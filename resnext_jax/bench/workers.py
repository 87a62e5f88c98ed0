"""Benchmark rows in worker processes: a pipe protocol, at most N alive, timed in rounds.

Each row runs in its own child process, so compile caches, allocator pools and peak-memory
counters of one never reach another. The parent writes one JSON request per line to a
worker's stdin and reads one JSON answer per line from its stdout (`serve` is the worker's
side): first the row to build, answered with `hello`; then `build` (weights, untimed),
`setup` (compile, warm up), `run` with a number of steps (answered with their seconds) and
`finish` (peak memory). An exception in the worker comes back as {"error": ...}.

`time_in_groups` keeps at most `max_workers` workers alive. The first row that builds is the anchor:
its worker lives from the first group to the last, and the other rows are timed beside it in
groups of `max_workers - 1`; a group's workers are started, built side by side, compiled one
at a time, timed, and ended before the next group starts. A round is a block of steps from
each worker of the group in turn (reversed every other round), so that load on a shared
machine hits every row of a group alike; a row's step time is the median over its rounds of
(round time / steps in it). Each row keeps the anchor's step times from the rounds of its own
group, and ratios between rows go through them (resnext_jax.bench.models.add_ratios): rows of
one group compare directly, rows of different groups each through the anchor timed beside it.

A worker that dies (killed when memory runs out, a crash, a closed pipe) or answers with an
error fails its own row only; the others go on. If the anchor's worker dies, the next group
takes a new anchor, and rows timed beside different anchors carry no ratio between them.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable


class WorkerError(RuntimeError):
    """A worker failed; the message names the row."""


class Worker:
    """A child process driven over a pipe: one JSON request per line, one JSON answer per line."""

    def __init__(self, label: str, argv: list[str], env: dict | None = None):
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip

    def request(self, **message):
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: the worker is gone
            raise WorkerError(f"{self.label}: {self._ended()}") from None

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.label}: {self._ended()}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise WorkerError(f"{self.label}: a garbled answer {line[:80]!r}") from None
        if "error" in answer:
            raise WorkerError(f"{self.label}: {answer['error']}")
        return answer

    def call(self, **message) -> dict:
        self.request(**message)
        return self.reply()

    def _ended(self) -> str:
        """How the worker ended, once its pipe has closed."""
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # closed its pipe but lingers
            self.proc.kill()
            self.proc.wait()
            return "worker closed its pipe and was killed"
        if code >= 0:
            return f"worker exited (status {code})"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
        hint = ": out of memory?" if -code == signal.SIGKILL else ""
        return f"worker died (signal {-code}, {name}{hint})"

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def serve(make_bench: Callable[[dict], object]):
    """The worker's side: build a bench from the first request, then answer its commands.

    A bench has `hello()`, `build()`, `setup()`, `run(steps)` (seconds) and `finish()`, each
    returning what is sent back. Library prints go to stderr; stdout carries only answers.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    request = json.loads(sys.stdin.readline())
    try:
        bench = make_bench(request)
        protocol.write(json.dumps(bench.hello()) + "\n")
        for line in sys.stdin:
            message = json.loads(line)
            if message["cmd"] == "run":
                answer = {"seconds": bench.run(message["steps"])}
            else:
                answer = getattr(bench, message["cmd"])()
            protocol.write(json.dumps(answer) + "\n")
            if message["cmd"] == "finish":
                break
    except Exception as e:  # reported to the parent, which names the row
        traceback.print_exc()
        protocol.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")


def round_sizes(steps: int, rounds: int) -> list[int]:
    """`steps` split over at most `rounds` rounds, as evenly as possible."""
    rounds = min(rounds, steps)
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


@dataclasses.dataclass(eq=False)
class Slot:
    """One row: how to start its worker, and what the worker answered."""

    label: str
    start: Callable[[], Worker]  # starts the worker and asks for the row; it answers hello
    worker: Worker | None = None  # while alive
    hello: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)  # build's and setup's answers
    finish: dict = dataclasses.field(default_factory=dict)
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per step, by round
    anchor: "Slot | None" = None  # the row timed beside this one in each of its rounds
    anchor_times: list[float] = dataclasses.field(default_factory=list)  # its, in those rounds
    error: str = ""  # why the row failed

    @property
    def timed(self) -> bool:
        """Alive and to be timed: not failed, not n/a."""
        return self.worker is not None and "na" not in self.info


def to_stderr(message):
    print(message, file=sys.stderr)


def time_in_groups(slots: list[Slot], sizes: list[int], max_workers: int, warn=to_stderr):
    """Time every slot in rounds of `sizes` steps, at most `max_workers` workers alive at once.

    `warn` gets each failure's message. The slots are filled in place (see the docstring).
    """
    if max_workers < 2:
        raise ValueError(f"max_workers={max_workers}: the anchor and at least one row")
    queue, anchor = list(slots), None
    try:
        while queue:
            group = []
            while queue and len(group) + (anchor is not None) < max_workers:
                slot = queue.pop(0)
                if _start(slot, warn):
                    group.append(slot)
            _prepare(group, warn)
            group = [s for s in group if s.timed]
            if anchor is None and group:
                anchor = group.pop(0)
                anchor.anchor = anchor
            if anchor is not None and group:
                beside = _rounds([anchor, *group], sizes, warn)
                for slot in group:
                    slot.anchor, slot.anchor_times = anchor, beside
                    _collect_row(slot, warn)
            if anchor is not None and anchor.worker is None:  # died: the next group takes one
                anchor = None
        if anchor is not None:
            if not anchor.times:  # no other row was timed beside it
                _rounds([anchor], sizes, warn)
            anchor.anchor_times = anchor.times
            _collect_row(anchor, warn)
    finally:
        for slot in slots:
            _close(slot)


def _start(slot, warn) -> bool:
    try:
        slot.worker = slot.start()
    except OSError as e:  # no process: fork refused for want of memory, say
        _fail(slot, f"{slot.label}: no worker started ({e})", warn)
    except WorkerError as e:
        _fail(slot, e, warn)
    return slot.worker is not None


def _request(slot, warn, **message):
    """The answer, or None once the slot has failed (a dead worker fails its row only)."""
    try:
        return slot.worker.call(**message)
    except WorkerError as e:
        _fail(slot, e, warn)
        return None


def _fail(slot, error, warn):
    slot.error, slot.times = str(error), []
    warn(str(error))
    _close(slot)


def _close(slot):
    if slot.worker is not None:
        slot.worker.close()
        slot.worker = None


def _prepare(group, warn):
    """Hello and build side by side (untimed), then compile one worker at a time (timed)."""

    def each(action):
        for slot in [s for s in group if s.worker]:
            try:
                action(slot)
            except WorkerError as e:
                _fail(slot, e, warn)

    each(lambda s: s.hello.update(s.worker.reply()))  # the answer to the row it was asked for
    each(lambda s: s.worker.request(cmd="build"))
    each(lambda s: s.info.update(s.worker.reply()))
    for slot in group:
        if slot.worker and "na" in slot.info:  # nothing to time: free its memory now
            _close(slot)
        elif slot.worker and (info := _request(slot, warn, cmd="setup")) is not None:
            slot.info.update(info)


def _rounds(members, sizes, warn) -> list[float]:
    """Each round a block of steps from every live member; the first member's times back."""
    first = []
    for i, steps in enumerate(sizes):
        for slot in members if i % 2 == 0 else members[::-1]:
            if slot.worker is None:
                continue
            if (done := _request(slot, warn, cmd="run", steps=steps)) is not None:
                slot.times.append(done["seconds"] / steps)
                if slot is members[0]:
                    first.append(done["seconds"] / steps)
    return first


def _collect_row(slot, warn):
    if slot.worker is not None and (done := _request(slot, warn, cmd="finish")) is not None:
        slot.finish = done
    _close(slot)
