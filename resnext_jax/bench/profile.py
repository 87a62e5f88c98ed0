"""Where a compiled step spends its time, layer by layer, from a profiler trace: a markdown table.

    python scripts/profile_step.py --models=resnet50,resnext50_32x4d --batch=16 --res=224

Each model's step is built as scripts/benchmark.py builds it (resnext_jax.bench.models.JaxBench,
synthetic data) and warmed up; then the models' steps are traced in turn with jax.profiler,
one step per trace, --reps times, and each cell is the median over the reps (so that a machine
whose speed drifts slows every model alike). Every op the
trace shows is attributed, through the compiled HLO's metadata, to the layer that made it (the
module's name: stem_conv, conv1, conv2, conv3, proj_conv; every batch norm as "batch norm")
and to its pass: forward, backward, or the rest (ops outside the model's autodiff scopes: the
loss, the gradients' sums XLA names after the step, the optimizer).
Cells are ms per step. XLA CPU runs independent ops at once, so the ops' durations can add up
to more than the step's wall time; the last two rows give both.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile

from resnext_jax.bench import models
from resnext_jax.devices import runtime

# An HLO instruction: its name and the rest of its line.
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CONV = re.compile(r"^(stem_conv|conv\d+|proj_conv)$")
_NORM = re.compile(r"^(stem_bn|bn\d+|proj_bn)$|norm")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
PASSES = ("forward", "backward", "rest")


def layer_of(op_name: str, line: str) -> str:
    """The layer an HLO instruction belongs to, from its metadata `op_name` and its line."""
    parts = op_name.split("/")
    for part in reversed(parts):
        if _CONV.match(part):
            return part
    if any(_NORM.search(part) for part in parts):
        return "batch norm"
    target = _TARGET.search(line)
    if "pool" in op_name or (target and "pool" in target.group(1)):
        return "max pool"
    if any(f" {c}(" in line or f" {c}-start(" in line for c in _COLLECTIVES):
        return "collectives"
    return "other"


def pass_of(op_name: str, train: bool = True) -> str:
    """A training step's forward (under autodiff's jvp), backward (its transpose) or rest
    (everything else); all of an inference step is forward."""
    if not train:
        return "forward"
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "rest"


def instruction_layers(hlo_text: str, train: bool = True) -> dict:
    """{instruction name: (layer, pass)} for every instruction of compiled HLO text."""
    layers = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op_name = _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ""
        layers[m.group(1)] = (layer_of(op_name, line), pass_of(op_name, train))
    return layers


def attribute(events, layers: dict) -> collections.Counter:
    """{(layer, pass): ms} from one step's trace events ({"ph", "name", "dur" in us}) and
    `instruction_layers` of its HLO."""
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in layers:
            ms[layers[e["name"]]] += e["dur"] / 1e3
    return ms


def traced_step(bench, layers: dict) -> tuple[collections.Counter, float]:
    """({(layer, pass): ms}, wall ms) of one step of a built and warmed-up JaxBench whose
    step's HLO gave `layers` (`instruction_layers`)."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            seconds = bench.run(1)
        found = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        if not found:
            raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
        with gzip.open(found[0]) as f:
            events = json.load(f)["traceEvents"]
    return attribute(events, layers), 1e3 * seconds


def profile(specs, opts, reps: int) -> dict:
    """{spec: ({(layer, pass): median ms}, median wall ms)}, the models traced in turn."""
    benches, layers = {}, {}
    for spec in specs:
        benches[spec] = models.JaxBench(spec, opts[spec])
        benches[spec].build()
        benches[spec].setup()  # compiles and warms up
        layers[spec] = instruction_layers(benches[spec].step.as_text(), opts[spec].mode == "train")
    runs = {spec: [] for spec in specs}
    for _ in range(reps):
        for spec, bench in benches.items():
            runs[spec].append(traced_step(bench, layers[spec]))
    results = {}
    for spec, traced in runs.items():
        keys = set().union(*(ms.keys() for ms, _ in traced))
        ms = collections.Counter({k: statistics.median(t[k] for t, _ in traced) for k in keys})
        results[spec] = (ms, statistics.median(wall for _, wall in traced))
    return results


def table(results: dict, mode: str) -> list[str]:
    """Markdown rows: a layer per row; per model, its passes and their total as columns."""
    passes = PASSES if mode == "train" else ("forward",)
    names = list(results)
    head = [f"{n} {p}" for n in names for p in (*passes, "total")]
    totals = {n: collections.Counter() for n in names}
    for n, (ms, _) in results.items():
        for (layer, _), v in ms.items():
            totals[n][layer] += v
    order = sorted(totals[names[0]].keys() | set().union(*totals.values()),
                   key=lambda layer: -totals[names[0]][layer])  # fmt: skip
    rows = ["| layer | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for layer in order:
        cells = []
        for n in names:
            cells += [f"{results[n][0][layer, p]:.1f}" for p in passes]
            cells.append(f"{totals[n][layer]:.1f}")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    summed, wall = [], []
    for n in names:
        ms = results[n][0]
        summed += [f"{sum(v for (_, q), v in ms.items() if q == p):.1f}" for p in passes]
        summed.append(f"{sum(ms.values()):.1f}")
        wall += [""] * len(passes) + [f"{results[n][1]:.1f}"]
    rows.append("| ops, summed | " + " | ".join(summed) + " |")
    rows.append("| step, wall | " + " | ".join(wall) + " |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--models", default="resnet50,resnext50_32x4d", help="variant names or configs, by commas")
    add("--mode", choices=models.MODES, default="train")
    add("--batch", type=int, default=16, help="images per step")
    add("--res", type=int, default=0, help="input size (0: each model's own)")
    add("--dtype", default="float32", help="compute dtype (as scripts/benchmark.py)")
    add("--reps", type=int, default=3, help="traced steps per model, taken in turn")
    add("--warmup", type=int, default=2, help="untimed steps after compiling")
    args = parser.parse_args(argv)
    specs = args.models.split(",")
    opts = {spec: models._parser().parse_args([
        f"--models={spec}", f"--mode={args.mode}", f"--batch={args.batch}", f"--res={args.res}",
        f"--dtype={args.dtype}", f"--warmup={args.warmup}"]) for spec in specs}  # fmt: skip
    results = profile(specs, opts, args.reps)
    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {runtime.xla_cpu_fusions()}, "
          f"{args.mode}, batch {args.batch}, {args.dtype}, ms per step (median of "
          f"{args.reps} traced steps each, the models in turn)\n")  # fmt: skip
    print("\n".join(table(results, args.mode)))
    return 0
