"""Training or inference throughput of our Flax models on synthetic data, beside torchvision's.

    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=16 --mode=train --torch
    python scripts/benchmark.py --models=fashion_mnist,resnext29_8x64d --mode=infer --format=json
    python scripts/benchmark.py --models=resnext50_32x4d --impl=auto,xla_auto,shift
    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=8 --devices=1,2

`--impl` sets the grouped convs' implementation (resnext_jax.grouped_conv); with several, each
model is timed once per implementation, side by side, and torch once beside the first.

A model is a variant name (`resnet50`, `resnext50_2x40d`, `resnext29_8x64d`, `_tiny_resnext`)
or a config (`fashion_mnist`, `cifar:model=resnext29_16x64d`, `configs/table3.py:depth=101`):
a config brings its model, input size and optimizer. Input size: `--res`, else the config's,
else 224 for ImageNet-stem models and 32 for CIFAR-stem ones.

Each (model, implementation, framework) row runs in a fresh worker process, so compile caches,
allocator pools and peak-memory counters of one never reach another. The parent runs the
workers in rounds, each round a block of steps from every worker in turn (reversed every other
round), so that load on a shared machine hits every row alike; a row's step time is the median
over rounds of (round time / steps in it). Train mode times resnext_jax.train.train_step
(forward, loss, backward, SGD momentum update, BN statistics), jitted as the trainer does;
torch runs the same SGD settings (lr, momentum, Nesterov, weight decay). Infer is an
eval-mode forward.

`--devices=N` times the same step on N devices (on CPU, N simulated ones: XLA's
`--xla_force_host_platform_device_count`), each device holding `--batch` images, as the
trainer runs it: one program per device (resnext_jax.parallel), BN over groups of
`model.bn_group_size` images where that divides `--batch`, else over each device's `--batch`.
`--devices=1,2` times each model on 1 and on 2 devices, side by side. Each row names the
compiled step's cross-device ops and XLA's count of its FLOPs per device.
"""

import argparse
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

import configs
from configs import default
from resnext_jax import config_utils, grouped_conv, parallel, runtime, variants

MODES = ("train", "infer")
DTYPES = tuple(variants.DTYPES)
FORMATS = ("markdown", "json")
MB = 2**20
ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    try:
        counts = [int(n) for n in args.devices.split(",")]
    except ValueError:
        parser.error(f"--devices={args.devices}: device counts by commas, such as 1,2")
    if min(args.steps, args.rounds, args.batch, *counts) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch and --devices must be >= 1, --warmup >= 0")
    if args.torch and counts != [1]:
        parser.error("--torch times one device: leave out --devices or --torch")
    specs = _split_models(args.models)
    impls = args.impl.split(",")
    if unknown := [i for i in impls if i not in grouped_conv.CHOICES]:
        parser.error(f"--impl: unknown {unknown}; choose from {list(grouped_conv.CHOICES)}")
    try:
        targets = [resolve(spec, args, impl, n) for spec in specs for impl in impls for n in counts]
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.torch and importlib.util.find_spec("torchvision") is None:
        parser.error("--torch needs torch and torchvision (bash scripts/setup.sh --test)")
    frameworks = ("jax", "torch") if args.torch else ("jax",)
    try:
        rows = measure(targets, frameworks, args)
    except WorkerError as e:
        sys.exit(f"benchmark.py: {e}")
    add_ratios(rows)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(markdown(rows, args))


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        + ", ".join(grouped_conv.CHOICES),
    )
    add("--dtype", choices=DTYPES, default="float32", help="compute dtype; params stay float32")
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
    first_impl: bool = True  # torch is timed once per model, beside its first --impl
    devices: int = 1

    @property
    def input_shape(self):
        return (self.res, self.res, self.config.model.input_channels)


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
    config_dir = pathlib.Path(configs.__file__).parent
    if path.endswith(".py"):
        config = config_utils.load_config(spec)
    else:
        try:
            model = variants.model_config(spec)
        except ValueError as e:
            if not (config_dir / f"{path}.py").is_file():
                names = sorted(p.stem for p in config_dir.glob("*.py") if p.stem != "__init__")
                raise ValueError(f"{e} Or a config of configs/: {', '.join(names)}.") from None
            suffix = f":{config_args}" if config_args else ""
            config = config_utils.load_config(f"{config_dir / path}.py{suffix}")
        else:
            config = default.get_config()
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
# The parent: workers, rounds, rows


class WorkerError(RuntimeError):
    """A worker failed; the message names the row."""


class Worker:
    """A child process that times one (model, framework) pair, driven over a pipe."""

    def __init__(self, target: Target, framework: str, args):
        self.target, self.framework = target, framework
        self.hello, self.info, self.times = {}, {}, []
        self.label = f"{target.name} ({framework})"
        env = dict(os.environ)
        # Several workers share one GPU: each takes what it uses, not 75% up front.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # The worker imports this checkout's packages, installed or not (as the parent did).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if target.devices > 1:  # on CPU, simulated devices; accelerators ignore the flag
            flag = f"--xla_force_host_platform_device_count={target.devices}"
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), flag]))
        argv = [sys.executable, os.path.abspath(__file__), "--worker"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        impl = target.config.model.conv_impl
        self.request(framework=framework, spec=target.name, impl=impl, devices=target.devices,
                     args=vars(args))  # fmt: skip

    def request(self, **message):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.label}: the worker exited (status {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"{self.label}: {answer['error']}")
        return answer

    def call(self, **message) -> dict:
        self.request(**message)
        return self.reply()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def round_sizes(steps: int, rounds: int) -> list[int]:
    """`steps` split over at most `rounds` rounds, as evenly as possible."""
    rounds = min(rounds, steps)
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def measure(targets, frameworks, args) -> list[dict]:
    """One row per (target, framework): build all at once, compile one at a time, then rounds."""
    workers = [
        Worker(t, f, args) for t in targets for f in frameworks if f == "jax" or t.first_impl
    ]
    try:
        for w in workers:
            w.hello = w.reply()
        for w in workers:  # building (initializing weights) is untimed: side by side
            w.request(cmd="build")
        for w in workers:
            w.info = w.reply()
        live = [w for w in workers if "na" not in w.info]

        def call(w, **message):
            """A worker that dies (out of memory, say) leaves its row failed, not the table."""
            try:
                return w.call(**message)
            except WorkerError as e:
                w.info["na"], w.times = f"failed: {e}", []
                live.remove(w)
                print(f"benchmark.py: {e}", file=sys.stderr)
                return None

        for w in list(live):  # compile times are timed: one worker at a time
            if (info := call(w, cmd="setup")) is not None:
                w.info.update(info)
        for i, steps in enumerate(round_sizes(args.steps, args.rounds)):
            for w in list(live if i % 2 == 0 else live[::-1]):
                if (done := call(w, cmd="run", steps=steps)) is not None:
                    w.times.append(done["seconds"] / steps)
        finish = {w: call(w, cmd="finish") for w in list(live)}
        return [_row(w, finish.get(w) or {}, args) for w in workers]
    finally:
        for w in workers:
            w.close()


def _row(w, finish, args) -> dict:
    t = w.target
    row = dict(
        model=t.name,
        framework=w.framework,
        mode=args.mode,
        images_per_sec=None,
        step_time_ms=None,
        compile_s=w.info.get("compile_s"),
        peak_memory_mb=finish.get("peak_memory_mb"),
        peak_memory=finish.get("peak_memory"),
        xla_memory_mb=w.info.get("xla_memory_mb"),
        batch=args.batch,
        devices=t.devices,
        images_per_sec_per_device=None,
        flops_per_device=w.info.get("flops_per_device"),
        collectives=w.info.get("collectives"),
        res=t.res,
        input="x".join(map(str, t.input_shape)),
        dtype=args.dtype,
        impl=w.info.get("impl", ""),
        variant=w.info.get("variant", ""),
        threads=w.info.get("threads"),
        device=w.hello["device"],
        version=w.hello["version"],
        xla=w.hello.get("xla"),
        steps=args.steps,
        warmup=args.warmup,
        round_step_ms=[1e3 * s for s in w.times],
        note=w.info.get("na", ""),
    )
    if w.times:
        step = statistics.median(w.times)
        ips = args.batch * t.devices / step
        row.update(images_per_sec=ips, images_per_sec_per_device=ips / t.devices,
                   step_time_ms=1e3 * step)  # fmt: skip
    return row


def add_ratios(rows):
    """Each row's img/s over the first measured model's of its framework, and jax over torch.

    A jax row is compared with its model's torch row; a torch row carries the ratio of its
    model's first jax row (the first --impl).
    """
    first = {}
    for r in rows:
        ips = r["images_per_sec"]
        if ips and r["framework"] not in first:
            first[r["framework"]] = r
        base = first.get(r["framework"])
        r["vs_first"] = ips / base["images_per_sec"] if ips and base else None
        r["vs_first_model"] = base["model"] if base else None
    torch, first_jax = {}, {}  # a model's torch row, and its jax row of the first --impl
    for r in rows:
        (torch if r["framework"] == "torch" else first_jax).setdefault(r["model"], r)
    for r in rows:
        jax = r if r["framework"] == "jax" else first_jax.get(r["model"], {})
        jax_ips = jax.get("images_per_sec")
        torch_ips = torch.get(r["model"], {}).get("images_per_sec")
        r["jax_over_torch"] = jax_ips / torch_ips if jax_ips and torch_ips else None


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
    gpus = sorted({r["device"] for r in rows if r["device"] != "cpu"})
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
    header = (
        f"{args.mode}, batch {args.batch}{_per_device(args)}, {args.dtype}, impl {args.impl}"
        f"{', torch channels_last' if torch and args.channels_last else ''}"
        f"{''.join(f', torch threads {t}' for t in threads)}; "
        f"{args.steps} timed steps in {len(round_sizes(args.steps, args.rounds))} rounds after "
        f"{args.warmup} warm-up; {machine(rows)}, {runtime.allocator()}"
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
# The worker: one (model, framework) pair in its own process


def _worker(args):
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only replies
    request = json.loads(sys.stdin.readline())
    opts = argparse.Namespace(**request["args"])
    try:
        bench = (JaxBench if request["framework"] == "jax" else TorchBench)(
            request["spec"], opts, request["impl"], request["devices"]
        )
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
        try:  # under tcmalloc (resnext_jax.runtime), malloc_trim does not reach its free pages
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

        from resnext_jax import optim, train

        super().__init__(spec, opts, impl, devices)
        self.jax, self.train, self.optim = jax, train, optim

    def hello(self):
        device = self.jax.devices()[0]
        name = "cpu" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}"
        hello = {"device": name, "version": f"jax {self.jax.__version__}"}
        if device.platform == "cpu":
            hello["xla"] = runtime.xla_cpu_fusions()
        return hello

    def build(self):
        """The trainer's state and step function on one synthetic batch; nothing compiled yet."""
        jax, train, config = self.jax, self.train, self.target.config
        devices = self.target.devices
        if len(jax.devices()) < devices:
            raise ValueError(f"--devices={devices}, but JAX sees {len(jax.devices())}")
        run = train.build_run(config, devices=jax.devices()[:devices])
        tx = self.optim.create_optimizer(config, steps_per_epoch=1)
        state = train.create_train_state(run, tx, jax.random.key(config.seed))
        batch = run.global_batch(next(run.source.train_batches(config.batch_size, config.seed)))
        if self.opts.mode == "train":
            self.fn = train.make_train_step(run)
            self.args = [state, batch]
        else:
            self.fn = train.make_predict_step(run)
            self.args = [{"params": state.params, "batch_stats": state.batch_stats}, batch["image"]]
        impl = config.model.conv_impl
        impls = ",".join(conv_impls(run.model, (1, *self.target.input_shape)))
        return {
            "impl": f"{impl} ({impls})" if impl in grouped_conv.AUTO else impl,
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
            for _ in range(steps):  # dispatched back to back, as the trainer does
                self.args[0], _ = self.step(*self.args)
            self.jax.block_until_ready(self.args[0])
        else:
            out = None
            for _ in range(steps):
                out = self.step(*self.args)
            self.jax.block_until_ready(out)
        return time.perf_counter() - start

    def finish(self):
        stats = self.jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return {"peak_memory_mb": stats["peak_bytes_in_use"] / MB, "peak_memory": "device_peak"}
        return self._rss_peak()


def conv_impls(model, input_shape) -> list[str]:
    """The grouped-conv implementations the model's convs run (`auto` resolved)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    used = set()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, grouped_conv.Conv) and context.method_name == "__call__":
            impl = module.impl if module.groups > 1 else "auto"
            x, k = args[0], module.kernel_size
            kernel = (k, k, x.shape[-1] // module.groups, module.features)
            used.add(
                grouped_conv.resolve_impl(impl, x.shape, kernel, module.strides, module.groups)
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    return sorted(used)


class TorchBench(_Bench):
    def __init__(self, spec, opts, impl=None, devices=1):
        import torch

        from resnext_jax import interop, optim

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


if __name__ == "__main__":
    runtime.use_tcmalloc()
    main()
