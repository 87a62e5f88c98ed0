"""resnext_jax.bench.models (scripts/benchmark.py): rows of both frameworks and modes, config
aliases, clear errors, at most --max-workers workers alive, a dead worker failing its row only."""

import functools
import json
import sys

import pytest

from resnext_jax.bench import models, workers
from resnext_jax.ops import conv

# A worker with a fake bench (no JAX): the row named "killed" SIGKILLs itself as it steps.
FAKE_CHILD = """
import os, signal
from resnext_jax.bench import workers

class Bench:
    def __init__(self, request):
        self.label = request["label"]
    def hello(self):
        return {"device": "cpu"}
    def build(self):
        return {}
    def setup(self):
        return {}
    def run(self, steps):
        if self.label == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        return 0.01 * steps
    def finish(self):
        return {"peak": 1}

workers.serve(Bench)
"""

TINY = ["--batch=2", "--steps=2", "--rounds=2", "--warmup=1"]
KEYS = {"model", "framework", "mode", "images_per_sec", "step_time_ms", "compile_s",
        "peak_memory_mb", "batch", "res", "dtype", "impl"}  # fmt: skip


def _run(capsys, *args):
    assert models.main([*args]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_train_json_beside_torch(capsys):
    # One torch thread: with a core busy elsewhere, two OpenMP threads run 10-40x slower here.
    rows = json.loads(_run(capsys, "--models=resnet18", "--torch", "--torch-threads=1", "--res=32",
                           "--format=json", *TINY))  # fmt: skip
    assert [(r["model"], r["framework"]) for r in rows] == [("resnet18", "jax"),
                                                            ("resnet18", "torch")]  # fmt: skip
    for r in rows:
        assert KEYS <= set(r)
        assert (r["mode"], r["batch"], r["res"], r["dtype"]) == ("train", 2, 32, "float32")
        assert r["images_per_sec"] > 0 and len(r["round_step_ms"]) == 2
        assert r["images_per_sec"] == pytest.approx(2e3 / r["step_time_ms"])
        assert r["peak_memory_mb"] > 0 and r["vs_first"] == 1.0
    jax_row, torch_row = rows
    picks = "onednn" if conv.onednn_usable() else "pointwise,xla"  # every conv, where built
    assert jax_row["impl"] == f"auto ({picks})" and jax_row["compile_s"] > 0
    assert jax_row["xla_memory_mb"] > 0 and torch_row["compile_s"] is None
    assert torch_row["threads"] == 1 and torch_row["impl"] == "eager"
    assert jax_row["jax_over_torch"] == pytest.approx(
        jax_row["images_per_sec"] / torch_row["images_per_sec"]
    )


@pytest.mark.slow
def test_infer_markdown_of_a_config_alias(capsys):
    out = _run(capsys, "--models=fashion_mnist", "--mode=infer", "--batch=4", "--steps=1",
               "--warmup=1")  # fmt: skip
    assert out.startswith("infer, batch 4, float32, impl auto; 1 timed steps in 1 rounds")
    assert "torch" not in out.splitlines()[0]
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 2
    model, framework, impl, size, ips, vs_first = table[1][:6]
    assert (model, framework, size, vs_first) == ("| fashion_mnist", "jax", "28x28x1",
                                                  "1.00x fashion_mnist")  # fmt: skip
    assert impl.startswith("auto (") and float(ips) > 0
    assert "peak MB: the worker's peak resident memory" in out


def test_torch_row_is_na_without_a_torchvision_model():
    args = models._parser().parse_args(["--torch", "--batch=2"])
    built = models.TorchBench("fashion_mnist", args).build()
    assert built["na"].startswith("no torchvision model with these layers")
    assert "'stem': 'cifar'" in built["na"]


def test_bad_model_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        models.main(["--models=resnet50,resnext50_32x4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnext50_32x4'" in err and "fashion_mnist" in err


def test_model_specs_and_input_sizes():
    assert models._split_models("resnet50, cifar:model=resnext29_16x64d,dataset=cifar100") == [
        "resnet50",
        "cifar:model=resnext29_16x64d,dataset=cifar100",
    ]
    args = models._parser().parse_args(["--batch=8", "--dtype=bfloat16", "--impl=dense"])
    sizes = {s: models.resolve(s, args).input_shape
             for s in ("resnet50", "resnext29_8x64d", "fashion_mnist")}  # fmt: skip
    assert sizes == {"resnet50": (224, 224, 3), "resnext29_8x64d": (32, 32, 3),
                     "fashion_mnist": (28, 28, 1)}  # fmt: skip
    config = models.resolve("cifar:model=resnext29_16x64d,dataset=cifar100", args).config
    assert (config.model.cardinality, config.model.num_classes) == (16, 100)
    model = config.model
    assert (model.dtype, model.conv_impl, config.batch_size) == ("bfloat16", "dense", 8)
    args.res = 64
    assert models.resolve("fashion_mnist", args).input_shape == (64, 64, 1)


def test_rounds_and_ratios():
    assert workers.round_sizes(7, 3) == [3, 2, 2] and workers.round_sizes(1, 5) == [1]
    rows = [
        dict(model="a", framework="jax", images_per_sec=10.0),
        dict(model="a", framework="torch", images_per_sec=None),
        dict(model="b", framework="jax", images_per_sec=7.0),
        dict(model="b", framework="torch", images_per_sec=3.5),
        dict(model="b", framework="jax", images_per_sec=1.75),  # a second --impl
    ]
    models.add_ratios(rows)
    assert [(r["vs_first"], r["vs_first_model"]) for r in rows] == [
        (1.0, "a"), (None, None), (0.7, "a"), (1.0, "b"), (0.175, "a")
    ]  # fmt: skip
    assert [r["jax_over_torch"] for r in rows] == [None, None, 2.0, 2.0, 0.5]


class FakeWorker:
    """A worker in this process: `run` takes `cost[model] * load()` seconds a step."""

    def __init__(self, target, framework, args, cost=None, load=lambda: 1.0, dies=()):
        self.target, self.framework, self.label = target, framework, target.name
        self.cost, self.load, self.dies = cost or {}, load, dies
        self.pending, self.closed = None, False

    def request(self, **message):
        self.pending = message

    def reply(self):
        message = self.pending or {}
        cmd = message.get("cmd")
        if cmd == "run" and self.target.name in self.dies:
            raise workers.WorkerError(f"{self.label}: the worker exited (status -9)")
        seconds = self.cost.get(self.target.name, 0.5) * self.load() * message.get("steps", 0)
        answers = {"build": {}, "setup": {}, "run": {"seconds": seconds}, "finish": {}}
        return answers.get(cmd, {"device": "cpu", "version": {}})  # else hello

    def call(self, **message):
        self.request(**message)
        return self.reply()

    def close(self):
        self.closed = True


def test_a_worker_that_dies_fails_its_row_not_the_table(monkeypatch):
    def start(target, framework, args):
        return FakeWorker(target, framework, args, dies=("resnext29_8x64d",))

    monkeypatch.setattr(models, "start_worker", start)
    args = models._parser().parse_args(["--batch=4", "--steps=2", "--rounds=2"])
    targets = [models.resolve(name, args) for name in ("resnet18", "resnext29_8x64d")]
    rows = models.measure(targets, ("jax",), args)
    assert rows[0]["images_per_sec"] == 8.0 and rows[0]["note"] == ""
    assert rows[1]["images_per_sec"] is None
    assert rows[1]["note"] == "failed: resnext29_8x64d: the worker exited (status -9)"


NAMES = ("_tiny_basic", "_tiny_bottleneck", "_tiny_resnext", "resnet18", "resnext29_8x64d")
COST = {"_tiny_basic": 1.0, "_tiny_bottleneck": 2.0, "_tiny_resnext": 4.0, "resnet18": 5.0,
        "resnext29_8x64d": 8.0}  # fmt: skip


def _fake_run(monkeypatch, max_workers, dies=()):
    """Five rows on fake workers, on a machine that slows with every worker started."""
    started = []
    alive = []  # live workers at each request

    def start(target, framework, args):
        worker = FakeWorker(target, framework, args, COST, lambda: 1 + 0.5 * len(started), dies)
        started.append(worker)
        real_request = worker.request

        def request(**message):
            alive.append(sum(not w.closed for w in started))
            real_request(**message)

        worker.request = request
        return worker

    monkeypatch.setattr(models, "start_worker", start)
    args = models._parser().parse_args(
        ["--batch=4", "--steps=4", "--rounds=2", f"--max-workers={max_workers}"]
    )
    rows = models.measure([models.resolve(n, args) for n in NAMES], ("jax",), args)
    models.add_ratios(rows)
    return rows, started, alive, args


@pytest.mark.parametrize("max_workers", [2, 3, 5])
def test_at_most_max_workers_alive_and_ratios_through_the_anchor(monkeypatch, max_workers):
    rows, started, alive, args = _fake_run(monkeypatch, max_workers)
    assert max(alive) == max_workers and all(w.closed for w in started)
    assert [w.target.name for w in started] == list(NAMES)
    assert [r["anchor_row"] for r in rows] == [0] * 5
    # The first row ran beside each group; each other row in one group, 2 rounds.
    groups = -(-4 // (max_workers - 1))
    assert [len(r["round_step_ms"]) for r in rows] == [2 * groups] + [2] * 4
    # Raw img/s carry the machine's slowdown; ratios through the anchor cancel it.
    assert [r["vs_first"] for r in rows] == pytest.approx([1.0, 0.5, 0.25, 0.2, 0.125])
    if max_workers == 2:
        assert rows[4]["images_per_sec"] / rows[0]["images_per_sec"] != pytest.approx(0.125)
    out = models.markdown(rows, args)
    grouped = f"workers: at most {max_workers} alive; _tiny_basic (jax) timed beside each group"
    assert (grouped in out) == (max_workers < 5)


def test_a_dead_anchor_hands_over_and_ratios_stay_within_one_anchor(monkeypatch):
    rows, started, alive, _ = _fake_run(monkeypatch, 2, dies=("_tiny_basic",))
    assert max(alive) == 2 and all(w.closed for w in started)
    assert rows[0]["note"] == "failed: _tiny_basic: the worker exited (status -9)"
    # Timed, but its anchor died in their first round, before it had a time beside it.
    assert rows[1]["images_per_sec"] > 0 and rows[1]["anchor_images_per_sec"] is None
    assert [r["anchor_row"] for r in rows] == [0, 0, 2, 2, 2]
    assert [r["vs_first"] for r in rows] == pytest.approx([None, None, 1.0, 0.8, 0.5])


@pytest.mark.slow
def test_a_killed_worker_fails_its_row_and_the_others_complete():
    """Real worker processes (a fake bench, no JAX): one is SIGKILLed as it steps, another's
    pipe is broken before it is asked to; the others run their rounds, two alive at most."""
    started, alive = [], []

    class Watched(workers.Worker):
        def request(self, **message):
            alive.append(sum(w.proc.poll() is None for w in started))
            if message.get("cmd") == "run" and self.label == "broken":
                self.proc.kill()  # the OOM killer's signal, before the parent writes
                self.proc.wait()
            super().request(**message)

    def start(label):
        worker = Watched(label, [sys.executable, "-c", FAKE_CHILD])
        started.append(worker)
        worker.request(label=label)
        return worker

    slots = [workers.Slot(label, functools.partial(start, label))
             for label in ("anchor", "killed", "broken", "last")]  # fmt: skip
    messages = []
    workers.time_in_groups(slots, [1, 1], max_workers=2, warn=messages.append)
    assert max(alive) == 2 and all(w.proc.poll() is not None for w in started)
    assert [s.error for s in slots] == [
        "",
        "killed: worker died (signal 9, SIGKILL: out of memory?)",
        "broken: worker died (signal 9, SIGKILL: out of memory?)",
        "",
    ]
    assert messages == [s.error for s in slots[1:3]]
    assert [len(s.times) for s in slots] == [6, 0, 0, 2]
    assert slots[3].anchor is slots[0] and slots[0].finish == {"peak": 1}


@pytest.mark.slow
def test_several_impls_side_by_side_with_torch_once(capsys):
    rows = json.loads(_run(capsys, "--models=_tiny_resnext", "--impl=auto,xla_auto", "--torch",
                           "--torch-threads=1", "--res=32", "--format=json", *TINY))  # fmt: skip
    assert [(r["model"], r["framework"], r["impl"].split(" ")[0]) for r in rows] == [
        ("_tiny_resnext", "jax", "auto"), ("_tiny_resnext", "torch", ""),
        ("_tiny_resnext", "jax", "xla_auto"),
    ]  # fmt: skip
    assert rows[1]["note"].startswith("no torchvision model")
    assert "onednn" not in rows[2]["impl"] and rows[2]["vs_first"] > 0
    assert ("onednn" in rows[0]["impl"]) == conv.onednn_usable()


def test_env_values_side_by_side_reach_the_jax_workers(capsys):
    """One JAX row per value, torch once; RESNEXT_JAX_ONEDNN=0 in its worker keeps `auto` off
    oneDNN there, which only the worker's environment can do."""
    args = ["--models=_tiny_resnext", "--env=RESNEXT_JAX_ONEDNN=1,0", "--torch", "--res=32"]
    rows = json.loads(_run(capsys, *args, "--torch-threads=1", "--format=json", *TINY))
    assert [(r["framework"], r["impl"].rpartition(", ")[2]) for r in rows] == [
        ("jax", "RESNEXT_JAX_ONEDNN=1"), ("torch", ""), ("jax", "RESNEXT_JAX_ONEDNN=0"),
    ]  # fmt: skip
    assert ("onednn" in rows[0]["impl"]) == conv.onednn_usable()
    assert "onednn" not in rows[2]["impl"] and rows[2]["vs_first"] > 0


@pytest.mark.parametrize("env", ["FOLD", "=1,0", "NOT A NAME=1", "FOLD="])
def test_a_malformed_env_is_a_usage_error(capsys, env):
    with pytest.raises(SystemExit):
        models.main([f"--env={env}"])
    assert "want NAME=VALUE" in capsys.readouterr().err


def test_an_unknown_impl_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        models.main(["--impl=auto,nope"])
    assert "--impl: unknown ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_devices_split_the_step_and_name_its_collectives(capsys):
    """--devices=1,2 (simulated on CPU) at --batch=8: each device computes the FLOPs of its
    own 8 images, as one device does, and the step all-reduces, nothing else (on one device,
    nothing at all)."""
    out = _run(capsys, "--models=_tiny_resnext", "--res=16", "--format=json", "--devices=1,2",
               "--batch=8", "--impl=xla_auto", *TINY[1:])  # fmt: skip
    one, two = json.loads(out)
    assert (one["devices"], two["devices"], two["batch"]) == (1, 2, 8)
    assert two["images_per_sec_per_device"] == pytest.approx(two["images_per_sec"] / 2)
    assert two["images_per_sec"] == pytest.approx(16e3 / two["step_time_ms"])
    assert set(two["collectives"]) == {"all-reduce"}
    assert not one["collectives"]
    assert two["flops_per_device"] == pytest.approx(one["flops_per_device"], rel=0.05)


def test_devices_with_torch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        models.main(["--models=resnet18", "--torch", "--devices=1,2"])
    assert exit_info.value.code == 2
    assert "--torch times one device" in capsys.readouterr().err


@pytest.mark.slow
def test_three_models_two_workers_and_one_killed(monkeypatch, capsys):
    """The real workers at --max-workers=2: never more than two alive, and the second row's
    worker SIGKILLed as it is asked to compile (as the OOM killer would) fails that row only."""
    started, alive = [], []

    class Watched(workers.Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

        def request(self, **message):
            alive.append(sum(w.proc.poll() is None for w in started))
            if message.get("cmd") == "setup" and self.label == "_tiny_bottleneck (jax)":
                self.proc.kill()
                self.proc.wait()
            super().request(**message)

    monkeypatch.setattr(workers, "Worker", Watched)
    code = models.main(["--models=_tiny_basic,_tiny_bottleneck,_tiny_resnext", "--res=16",
                        "--format=json", "--max-workers=2", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert code == 1 and max(alive) == 2 and len(started) == 3
    assert all(w.proc.poll() is not None for w in started)
    assert rows[1]["failed"] and rows[1]["images_per_sec"] is None
    died = "_tiny_bottleneck (jax): worker died (signal 9, SIGKILL: out of memory?)"
    assert rows[1]["note"] == f"failed: {died}" and died in captured.err
    assert "1 of 3 rows failed" in captured.err
    assert [r["anchor_row"] for r in rows] == [0, None, 0]  # it died before any round
    assert [len(r["round_step_ms"]) for r in rows] == [2, 0, 2]  # one group was timed
    assert rows[0]["vs_first"] == 1.0 and rows[2]["vs_first"] == pytest.approx(
        rows[2]["images_per_sec"] / rows[2]["anchor_images_per_sec"]
    )
