"""Training or inference throughput of our Flax models on synthetic data, beside torchvision's.

    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=16 --mode=train --torch
    python scripts/benchmark.py --models=fashion_mnist,resnext29_8x64d --mode=infer --format=json
    python scripts/benchmark.py --models=resnext50_32x4d --impl=auto,xla_auto,shift
    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=8 --devices=1,2
    python scripts/benchmark.py --models=resnext50_32x4d --env=RESNEXT_JAX_ONEDNN_FOLD=1,0

`--impl` sets the grouped convs' implementation (resnext_jax.ops.conv); with several, each
model is timed once per implementation, side by side, and torch once beside the first.
`--env=NAME=A,B` does the same for an environment variable of this project's JAX workers
(`RESNEXT_JAX_ONEDNN_FOLD=1,0`, say): one row per value, the value named in the impl column.

A model is a variant name (`resnet50`, `resnext50_2x40d`, `resnext29_8x64d`, `_tiny_resnext`)
or a config (`fashion_mnist`, `cifar:model=resnext29_16x64d`, `configs/table3.py:depth=101`):
a config brings its model, input size and optimizer. Input size: `--res`, else the config's,
else 224 for ImageNet-stem models and 32 for CIFAR-stem ones.

Each (model, implementation, framework) row runs in a fresh worker process
(`python -m resnext_jax.bench.models --worker`, driven by resnext_jax.bench.workers), so
compile caches, allocator pools and peak-memory counters of one never reach another. At most
`--max-workers` workers (default 2) are alive at once, which bounds memory to about that many
rows' models, optimizer states and compiled steps: the first row's worker (the anchor) stays
up for the whole run, and the other rows are timed beside it, `--max-workers` - 1 at a time,
each group started, compiled, timed and ended before the next. A round is a block of steps
from every worker of the group in turn (reversed every other round), so that load on a shared
machine hits the rows of a group alike; a row's step time is the median over its rounds of
(round time / steps in it); the anchor's spans every group.

Ratios ("vs first", "jax/torch") come only from rows timed side by side: each row's img/s is
divided by the anchor's img/s over the rounds of that row's own group (JSON: the row's
`anchor_images_per_sec`), and a ratio between two rows is the ratio of those. Rows of one
group thus compare directly, and rows of two groups through the anchor timed beside each,
which cancels a machine that got slower or faster between groups. With `--max-workers` at
least the number of rows, all rows form one group.

A worker that dies (killed when memory runs out, a crash, a broken pipe) or reports an error
fails its own row only: the row shows the error ("worker died (signal 9, SIGKILL: out of
memory?)"), the other rows complete, and the exit status is 1. If the anchor's worker dies,
the next row that builds becomes the anchor of the rows after it; rows timed beside different
anchors carry no ratio between them, and "vs first" is then over the first row beside the
same anchor.

Train mode times resnext_jax.training.steps.train_step (forward, loss, backward, SGD momentum
update, BN statistics), compiled as the trainer compiles it (steps.make_train_step); torch
runs the same SGD settings (lr, momentum, Nesterov, weight decay). Infer is an eval-mode
forward (steps.make_predict_step).

`--devices=N` times the same step on N devices (on CPU, N simulated ones: XLA's
`--xla_force_host_platform_device_count`), each device holding `--batch` images, as the
trainer runs it: one program per device (resnext_jax.devices.parallel), BN over groups of
`model.bn_group_size` images where that divides `--batch`, else over each device's `--batch`.
`--devices=1,2` times each model on 1 and on 2 devices, side by side. Each row names the
compiled step's cross-device ops and XLA's count of its FLOPs per device.
"""

import argparse
import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import pathlib
import statistics
import sys
import time

from resnext_jax.bench import workers
from resnext_jax.devices import parallel, runtime
from resnext_jax.experiments import config_files
from resnext_jax.models import inspector, variants
from resnext_jax.ops import conv

MODES = ("train", "infer")
FORMATS = ("markdown", "json")
MB = 2**20
ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout, for the workers' imports


def main(argv=None) -> int:
    """Print the table; 1 where a row's worker failed, else 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        workers.serve(_bench)
        return 0
    try:
        counts = [int(n) for n in args.devices.split(",")]
    except ValueError:
        parser.error(f"--devices={args.devices}: device counts by commas, such as 1,2")
    if min(args.steps, args.rounds, args.batch, *counts) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch and --devices must be >= 1, --warmup >= 0")
    if args.max_workers < 2:
        parser.error("--max-workers must be >= 2: the first row's worker and one other")
    if args.torch and counts != [1]:
        parser.error("--torch times one device: leave out --devices or --torch")
    specs = _split_models(args.models)
    impls = args.impl.split(",")
    if unknown := [i for i in impls if i not in conv.CHOICES]:
        parser.error(f"--impl: unknown {unknown}; choose from {list(conv.CHOICES)}")
    try:
        envs = parse_env(args.env)
        targets = []
        for spec, impl, n in itertools.product(specs, impls, counts):
            target = resolve(spec, args, impl, n)
            for env in envs:  # torch beside the first --impl's first --env only
                first = target.first_impl and env == envs[0]
                targets.append(dataclasses.replace(target, env=env, first_impl=first))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.torch and importlib.util.find_spec("torchvision") is None:
        parser.error("--torch needs torch and torchvision (bash scripts/setup.sh --test)")
    frameworks = ("jax", "torch") if args.torch else ("jax",)

    def warn(error):
        print(f"{parser.prog}: {error}", file=sys.stderr)

    rows = measure(targets, frameworks, args, warn)
    add_ratios(rows)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(markdown(rows, args))
    if failed := [r for r in rows if r["failed"]]:
        print(f"{parser.prog}: {len(failed)} of {len(rows)} rows failed", file=sys.stderr)
        return 1
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="A worker that dies (out of memory, say) fails its own row, not the table; the "
        "exit status is then 1. How rows are timed and compared: resnext_jax/bench/models.py.",
    )
    add = parser.add_argument
    add("--models", default="resnet50,resnext50_32x4d", help="variant names or configs, by commas")
    add("--mode", choices=MODES, default="train")
    add("--batch", type=int, default=16, help="images per device")
    add("--devices", default="1", help="devices the step runs on (CPU: simulated), by commas")
    add("--res", type=int, default=0, help="input size (0: each model's own)")
    add(
        "--impl",
        default="auto",
        help="model.conv_impl (grouped convs only), by commas to time several side by side: "
        + ", ".join(conv.CHOICES),
    )
    add(
        "--env",
        default="",
        help="NAME=A,B: time each JAX row once per value of environment variable NAME, side "
        "by side (a switch of this project's, such as RESNEXT_JAX_ONEDNN_FOLD=1,0)",
    )
    add("--dtype", choices=tuple(variants.DTYPES), default="float32",
        help="compute dtype; params stay float32")  # fmt: skip
    add("--torch", action="store_true", help="also time torchvision's model of the same layers")
    add("--channels-last", action="store_true", help="torch: channels_last memory format")
    add(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads (0: the CPU cores; on a busy machine, fewer)",
    )
    add("--steps", type=int, default=10, help="timed steps per row")
    add("--warmup", type=int, default=2, help="untimed steps after compiling")
    add("--rounds", type=int, default=5, help="rounds the timed steps are split into")
    add(
        "--max-workers",
        "--max_workers",
        type=int,
        default=2,
        help="worker processes alive at once (>= 2; each holds one row's model, optimizer and "
        "compiled step): the first row's stays up, the others are timed beside it this many "
        "less one at a time, and ratios between them go through its img/s in each group",
    )
    add("--format", choices=FORMATS, default="markdown")
    add("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Target:
    """One model to time: the name asked for and the training config that describes it."""

    name: str
    config: object  # ml_collections.ConfigDict: model, optimizer, synthetic dataset, batch
    res: int
    first_impl: bool = True  # torch is timed once per model, beside its first --impl and --env
    devices: int = 1
    env: tuple = ()  # (NAME, value) pairs set in the JAX worker's environment

    @property
    def input_shape(self):
        return (self.res, self.res, self.config.model.input_channels)


def parse_env(text: str) -> list[tuple]:
    """`--env`'s NAME=A,B as [((NAME, A),), ((NAME, B),)]; [()] for none."""
    if not text:
        return [()]
    name, sep, values = text.partition("=")
    if not sep or not name.isidentifier() or not values:
        raise ValueError(f"--env={text}: want NAME=VALUE[,VALUE...], such as "
                         "RESNEXT_JAX_ONEDNN_FOLD=1,0")  # fmt: skip
    return [((name, value),) for value in values.split(",")]


def _split_models(text):
    """Split on commas, except inside a config's arguments (`cifar:model=x,dataset=y`)."""
    specs = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        if specs and "=" in piece and ":" not in piece:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def resolve(spec: str, args, impl: str | None = None, devices: int = 1) -> Target:
    """A variant name or a config (a path, or a file of configs/ by name) as a Target.

    `impl` is the grouped convs' implementation, by default the first of `args.impl`;
    `devices` how many devices share the step, each with `args.batch` images.
    """
    first = args.impl.split(",")[0]
    impl = impl or first
    path, _, config_args = spec.partition(":")
    config_dir = config_files.CONFIG_DIR
    if path.endswith(".py"):
        config = config_files.load_config(spec)
    else:
        try:
            model = variants.model_config(spec)
        except ValueError as e:
            if not (config_dir / f"{path}.py").is_file():
                names = sorted(p.stem for p in config_dir.glob("*.py"))
                raise ValueError(f"{e} Or a config of configs/: {', '.join(names)}.") from None
            suffix = f":{config_args}" if config_args else ""
            config = config_files.load_config(f"{config_dir / path}.py{suffix}")
        else:
            config = config_files.config_module("default").get_config()
            config.model = model
            config.dataset.image_size = 224 if model.stem == "imagenet" else 32
    res = args.res or config.dataset.image_size
    config.model.dtype = args.dtype
    config.model.conv_impl = impl
    config.dataset.name = "synthetic"
    config.dataset.image_size = res
    group = config.model.bn_group_size
    if devices > 1 and (not group or args.batch % group):  # BN within each device's images
        config.model.bn_group_size = args.batch
    config.dataset.num_train_examples = args.batch * devices
    config.dataset.num_eval_examples = args.batch * devices
    config.batch_size = args.batch * devices
    config.eval_batch_size = args.batch * devices
    variants.validate(config.model)
    return Target(spec, config, res, impl == first, devices)


# ---------------------------------------------------------------------------------------------
# The parent: one worker per row, at most --max-workers alive (resnext_jax.bench.workers)


def start_worker(target: Target, framework: str, args) -> workers.Worker:
    """A worker process for one (model, framework) row, asked for its row."""
    env = dict(os.environ)
    # Several workers share one GPU: each takes what it uses, not 75% up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # The worker imports this checkout's package, installed or not (as the parent did).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if target.devices > 1:  # on CPU, simulated devices; accelerators ignore the flag
        flag = f"--xla_force_host_platform_device_count={target.devices}"
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), flag]))
    if framework == "jax":
        env.update(target.env)
    argv = [sys.executable, "-m", __spec__.name, "--worker"]  # this module, also as __main__
    worker = workers.Worker(f"{target.name} ({framework})", argv, env)
    worker.request(framework=framework, spec=target.name, impl=target.config.model.conv_impl,
                   devices=target.devices, args=vars(args))  # fmt: skip
    return worker


def measure(targets, frameworks, args, warn=workers.to_stderr) -> list[dict]:
    """One row per (target, framework), timed as the module docstring says."""
    pairs = [(t, f) for t in targets for f in frameworks if f == "jax" or t.first_impl]
    slots = [
        workers.Slot(f"{t.name} ({f})", functools.partial(start_worker, t, f, args))
        for t, f in pairs
    ]
    sizes = workers.round_sizes(args.steps, args.rounds)
    workers.time_in_groups(slots, sizes, args.max_workers, warn)
    rows = []
    for slot, (target, framework) in zip(slots, pairs, strict=True):
        rows.append(row := _row(slot, target, framework, args))
        if slot.anchor is not None:  # the anchor's img/s in the rounds of this row's group
            i = slots.index(slot.anchor)
            anchor_ips = _images_per_sec(slot.anchor_times, pairs[i][0], args)
            row.update(anchor_row=i, anchor_images_per_sec=anchor_ips)
    return rows


def _images_per_sec(step_times, target, args):
    return args.batch * target.devices / statistics.median(step_times) if step_times else None


def _row(slot, target, framework, args) -> dict:
    info, finish, hello = slot.info, slot.finish, slot.hello
    row = dict(
        model=target.name,
        framework=framework,
        mode=args.mode,
        images_per_sec=None,
        step_time_ms=None,
        compile_s=info.get("compile_s"),
        peak_memory_mb=finish.get("peak_memory_mb"),
        peak_memory=finish.get("peak_memory"),
        xla_memory_mb=info.get("xla_memory_mb"),
        batch=args.batch,
        devices=target.devices,
        images_per_sec_per_device=None,
        flops_per_device=info.get("flops_per_device"),
        collectives=info.get("collectives"),
        res=target.res,
        input="x".join(map(str, target.input_shape)),
        dtype=args.dtype,
        impl=", ".join([info.get("impl", ""), *(f"{k}={v}" for k, v in target.env)])
        if framework == "jax"
        else info.get("impl", ""),
        variant=info.get("variant", ""),
        threads=info.get("threads"),
        device=hello.get("device"),
        version=hello.get("version"),
        xla=hello.get("xla"),
        steps=args.steps,
        warmup=args.warmup,
        round_step_ms=[1e3 * s for s in slot.times],
        anchor_row=None,
        anchor_images_per_sec=None,
        failed=bool(slot.error),
        note=f"failed: {slot.error}" if slot.error else info.get("na", ""),
    )
    if slot.times:
        ips = _images_per_sec(slot.times, target, args)
        row.update(images_per_sec=ips, images_per_sec_per_device=ips / target.devices,
                   step_time_ms=1e3 * statistics.median(slot.times))  # fmt: skip
    return row


def _speed(row):
    """img/s over the anchor's in the rounds beside it; plain img/s for rows without one."""
    ips = row["images_per_sec"]
    if not ips or "anchor_images_per_sec" not in row:
        return ips or None
    anchor = row["anchor_images_per_sec"]
    return ips / anchor if anchor else None


def _ratio(a, b):
    """a's img/s over b's, where both were timed beside the same anchor (or neither has one)."""
    if not a or not b or a.get("anchor_row") != b.get("anchor_row"):
        return None
    x, y = _speed(a), _speed(b)
    return x / y if x and y else None


def add_ratios(rows):
    """Each row's img/s over the first measured model's of its framework, and jax over torch.

    A jax row is compared with its model's torch row; a torch row carries the ratio of its
    model's first jax row (the first --impl). Rows timed in different groups compare through
    the anchor's img/s beside each (see the module docstring); after an anchor died, "first"
    is the first row timed beside the next anchor.
    """
    first = {}  # by framework and anchor: rows timed beside different anchors never compare
    for r in rows:
        key = (r["framework"], r.get("anchor_row"))
        if _speed(r) and key not in first:
            first[key] = r
        base = first.get(key)
        r["vs_first"] = _ratio(r, base) if r["images_per_sec"] else None
        r["vs_first_model"] = base["model"] if base else None
    torch, first_jax = {}, {}  # a model's torch row, and its jax row of the first --impl
    for r in rows:
        (torch if r["framework"] == "torch" else first_jax).setdefault(r["model"], r)
    for r in rows:
        jax = r if r["framework"] == "jax" else first_jax.get(r["model"])
        r["jax_over_torch"] = _ratio(jax, torch.get(r["model"]))


# ---------------------------------------------------------------------------------------------
# Output


def machine(rows) -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {_cpu_count()} cores"
    gpus = sorted({r["device"] for r in rows if r["device"] not in (None, "cpu")})
    return text + "".join(f"; {g}" for g in gpus)


def _versions(torch: bool) -> str:
    names = ("jax", "jaxlib", "flax") + (("torch", "torchvision") if torch else ())
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _per_device(args) -> str:
    return f" per device on {args.devices} devices" if args.devices != "1" else ""


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows, args) -> str:
    torch = any(r["framework"] == "torch" for r in rows)
    threads = sorted({r["threads"] for r in rows if r["threads"]})
    rounds = len(workers.round_sizes(args.steps, args.rounds))
    header = (
        f"{args.mode}, batch {args.batch}{_per_device(args)}, {args.dtype}, impl {args.impl}"
        f"{f', env {args.env}' if args.env else ''}"
        f"{', torch channels_last' if torch and args.channels_last else ''}"
        f"{''.join(f', torch threads {t}' for t in threads)}; "
        f"{args.steps} timed steps in {rounds} rounds after {args.warmup} warm-up; "
        f"{machine(rows)}, {runtime.allocator()}"
        f"{''.join(f', {x}' for x in sorted({r['xla'] for r in rows if r.get('xla')}))}; "
        f"{_versions(torch)}"
    )
    columns = ["model", "framework", "impl", "input", "img/s", "vs first", "jax/torch",
               "step ms", "compile s", "peak MB", "XLA MB", "devices", "img/s/device",
               "GFLOP/device", "collectives"]  # fmt: skip
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    notes = []
    for r in rows:
        if r["images_per_sec"] is None:
            notes.append(f"{r['model']} ({r['framework']}): n/a, {r['note']}")
        cells = [
            r["model"],
            r["framework"],
            r["impl"] or "-",
            r["input"],
            _fmt(r["images_per_sec"], ".2f") if r["images_per_sec"] else "n/a",
            "-" if r["vs_first"] is None else f"{r['vs_first']:.2f}x {r['vs_first_model']}",
            _fmt(r["jax_over_torch"] if r["framework"] == "jax" else None, ".2f", "x"),
            _fmt(r["step_time_ms"], ".1f"),
            _fmt(r["compile_s"], ".1f"),
            _fmt(r["peak_memory_mb"], ".0f"),
            _fmt(r["xla_memory_mb"], ".0f"),
            str(r["devices"]),
            _fmt(r["images_per_sec_per_device"], ".2f"),
            _fmt(r["flops_per_device"] and r["flops_per_device"] / 1e9, ".2f"),
            ", ".join(f"{op} {n}" for op, n in sorted((r["collectives"] or {}).items())) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = {r["peak_memory"] for r in rows if r["peak_memory"]}
    lines += ["", "img/s: batch / median step time. vs first: over the first model of the same "
              "framework. compile s: jax.jit(...).lower().compile(). GFLOP/device: XLA's cost "
              "analysis of the compiled step (one device's program; custom calls such as the "
              "oneDNN convs count 0). collectives: its cross-device ops, by count."]  # fmt: skip
    lines += [f"peak MB: {PEAK_MEMORY[k]}" for k in sorted(kinds)]
    if any(r["xla_memory_mb"] is not None for r in rows):
        lines.append("XLA MB: compiled.memory_analysis(), argument + output + temp - aliased.")
    anchors = sorted({r["anchor_row"] for r in rows if r.get("anchor_row") is not None})
    if len(rows) > args.max_workers and anchors:
        names = ", then ".join(f"{rows[i]['model']} ({rows[i]['framework']})" for i in anchors)
        lines.append(f"workers: at most {args.max_workers} alive; {names} timed beside each group "
                     "of the other rows, and ratios between rows of different groups go through "
                     "its img/s in each.")  # fmt: skip
    return "\n".join(lines + notes)


PEAK_MEMORY = {
    "device_peak": "the device allocator's peak bytes in use over the worker's life (JAX "
    "memory_stats()['peak_bytes_in_use'], torch.cuda.max_memory_allocated()).",
    "rss_increase": "the worker's peak resident memory while taking the timed steps, less its "
    "resident memory after imports (before any model was built): weights, optimizer state, "
    "activations, the runtime and compiled code. Heap freed after compiling and warming up is "
    "returned to the OS (malloc_trim, or tcmalloc's ReleaseFreeMemory) before the timed steps.",
    "rss_increase_with_compile": "the worker's peak resident memory over its life, compiling "
    "included, less its resident memory after imports.",
}


# ---------------------------------------------------------------------------------------------
# The worker: one (model, framework) row in its own process


def _bench(request):
    """The worker's bench for the row the parent asked for (resnext_jax.bench.workers.serve)."""
    bench = JaxBench if request["framework"] == "jax" else TorchBench
    opts = argparse.Namespace(**request["args"])
    return bench(request["spec"], opts, request["impl"], request["devices"])


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _status_kb(field) -> int | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _Bench:
    """What both frameworks share: the target, and resident memory around the timed steps."""

    def __init__(self, spec, opts, impl=None, devices=1):
        self.opts = opts
        self.target = resolve(spec, opts, impl, devices)
        self.baseline_kb = _status_kb("VmRSS")

    def _start_peak_window(self):
        """Return freed heap to the OS, then reset the resident-memory high-water mark (Linux).

        Without the trim, memory that compiling (XLA) or the first steps freed would still
        count as resident; without the reset, the peak of compiling itself would.
        """
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        # Under tcmalloc (resnext_jax.devices.runtime), malloc_trim does not reach its free pages.
        try:
            ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
        except (OSError, AttributeError):  # not preloaded
            pass
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            self.peak_kind = "rss_increase"
        except OSError:
            self.peak_kind = "rss_increase_with_compile"

    def _rss_peak(self) -> dict:
        peak = _status_kb("VmHWM")
        if peak is None or self.baseline_kb is None:
            return {}
        return {
            "peak_memory_mb": (peak - self.baseline_kb) * 1024 / MB,
            "peak_memory": self.peak_kind,
        }


class JaxBench(_Bench):
    def __init__(self, spec, opts, impl=None, devices=1):
        import jax

        from resnext_jax.training import optim, steps

        super().__init__(spec, opts, impl, devices)
        self.jax, self.steps, self.optim = jax, steps, optim

    def hello(self):
        device = self.jax.devices()[0]
        name = "cpu" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}"
        hello = {"device": name, "version": f"jax {self.jax.__version__}"}
        if device.platform == "cpu":
            hello["xla"] = runtime.xla_cpu_fusions()
        return hello

    def build(self):
        """The trainer's state and step function on one synthetic batch; nothing compiled yet."""
        jax, steps, config = self.jax, self.steps, self.target.config
        devices = self.target.devices
        if len(jax.devices()) < devices:
            raise ValueError(f"--devices={devices}, but JAX sees {len(jax.devices())}")
        run = steps.build_run(config, devices=jax.devices()[:devices])
        tx = self.optim.create_optimizer(config, steps_per_epoch=1)
        state = steps.create_train_state(run, tx, jax.random.key(config.seed))
        batch = run.global_batch(next(run.source.train_batches(config.batch_size, config.seed)))
        self.gate = runtime.StepGate()  # steps dispatched as the trainer does
        if self.opts.mode == "train":
            self.fn = steps.make_train_step(run)
            self.args = [state, batch]
        else:
            self.fn = steps.make_predict_step(run)
            self.args = [{"params": state.params, "batch_stats": state.batch_stats}, batch["image"]]
        impl = config.model.conv_impl
        impls = ",".join(inspector.conv_impls(run.model, (1, *self.target.input_shape)))
        return {
            "impl": f"{impl} ({impls})" if impl in conv.AUTO else impl,
            "variant": variants.variant_name(config.model),
        }

    def setup(self):
        start = time.perf_counter()
        self.step = self.fn.lower(*self.args).compile()
        compile_s = time.perf_counter() - start
        memory = self.step.memory_analysis()
        self.run(self.opts.warmup)
        self._start_peak_window()
        info = {
            "compile_s": compile_s,
            "flops_per_device": parallel.flops(self.step),
            "collectives": parallel.collectives(self.step),
        }
        if memory is not None:
            xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)  # fmt: skip
            info["xla_memory_mb"] = xla_bytes / MB
        return info

    def run(self, steps):
        start = time.perf_counter()
        if self.opts.mode == "train":
            for _ in range(steps):  # dispatched as the trainer does
                self.gate.wait(self.args[0])
                self.args[0], _ = self.step(*self.args)
            self.jax.block_until_ready(self.args[0])
        else:
            out = None
            for _ in range(steps):
                self.gate.wait(out)
                out = self.step(*self.args)
            self.jax.block_until_ready(out)
        return time.perf_counter() - start

    def finish(self):
        stats = self.jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return {"peak_memory_mb": stats["peak_bytes_in_use"] / MB, "peak_memory": "device_peak"}
        return self._rss_peak()


class TorchBench(_Bench):
    def __init__(self, spec, opts, impl=None, devices=1):
        import torch

        from resnext_jax.models import interop
        from resnext_jax.training import optim

        super().__init__(spec, opts, impl)
        self.torch, self.interop, self.optim = torch, interop, optim
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(opts.torch_threads or _cpu_count())

    def hello(self):
        torch = self.torch
        name = f"gpu: {torch.cuda.get_device_name(0)}" if self.device == "cuda" else "cpu"
        return {"device": name, "version": f"torch {torch.__version__}"}

    def build(self):
        """torchvision's model with our model's layers, its SGD, one random batch."""
        torch, opts, config = self.torch, self.opts, self.target.config
        try:
            model = self.interop.torchvision_model(config.model)
        except ValueError as e:
            return {"na": f"no torchvision model with these layers ({e})"}
        layout = torch.channels_last if opts.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=layout).train(opts.mode == "train")
        res, _, channels = self.target.input_shape
        self.x = torch.randn(config.batch_size, channels, res, res, device=self.device)
        self.x = self.x.to(memory_format=layout)
        self.y = torch.randint(
            0, config.model.num_classes, (config.batch_size,), device=self.device
        )
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=self.optim.scaled_learning_rate(config),
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        impl = "eager" + (" autocast" if opts.dtype == "bfloat16" else "")
        return {"impl": impl + (", channels_last" if opts.channels_last else ""),
                "variant": self.target.name, "threads": torch.get_num_threads()}  # fmt: skip

    def setup(self):
        if self.device == "cuda":
            self.torch.backends.cudnn.benchmark = True  # autotuned convs, as XLA's on GPU
        self.run(self.opts.warmup)
        self._start_peak_window()
        return {}

    def _autocast(self):
        return self.torch.autocast(self.device, self.torch.bfloat16,
                                   enabled=self.opts.dtype == "bfloat16")  # fmt: skip

    def run(self, steps):
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            if self.opts.mode == "train":
                with self._autocast():
                    loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            else:
                with torch.inference_mode(), self._autocast():
                    self.model(self.x)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def finish(self):
        if self.device == "cuda":
            peak = self.torch.cuda.max_memory_allocated()
            return {"peak_memory_mb": peak / MB, "peak_memory": "device_peak"}
        return self._rss_peak()


if __name__ == "__main__":  # a worker: `python -m resnext_jax.bench.models --worker`
    # No use_tcmalloc() here: a worker runs under the allocator of the parent, which the header
    # names (scripts/benchmark.py re-executes itself under tcmalloc before starting any).
    sys.exit(main())
