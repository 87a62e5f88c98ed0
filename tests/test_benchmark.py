"""scripts/benchmark.py: rows of both frameworks and modes, config aliases, clear errors."""

import importlib.util
import json
import pathlib

import pytest

from resnext_jax import grouped_conv

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

TINY = ["--batch=2", "--steps=2", "--rounds=2", "--warmup=1"]
KEYS = {"model", "framework", "mode", "images_per_sec", "step_time_ms", "compile_s",
        "peak_memory_mb", "batch", "res", "dtype", "impl"}  # fmt: skip


def _run(capsys, *args):
    benchmark.main([*args])
    return capsys.readouterr().out


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
    assert jax_row["impl"] == "auto (pointwise,xla)" and jax_row["compile_s"] > 0
    assert jax_row["xla_memory_mb"] > 0 and torch_row["compile_s"] is None
    assert torch_row["threads"] == 1 and torch_row["impl"] == "eager"
    assert jax_row["jax_over_torch"] == pytest.approx(
        jax_row["images_per_sec"] / torch_row["images_per_sec"]
    )


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
    args = benchmark._parser().parse_args(["--torch", "--batch=2"])
    built = benchmark.TorchBench("fashion_mnist", args).build()
    assert built["na"].startswith("no torchvision model with these layers")
    assert "'stem': 'cifar'" in built["na"]


def test_bad_model_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--models=resnet50,resnext50_32x4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnext50_32x4'" in err and "fashion_mnist" in err


def test_model_specs_and_input_sizes():
    assert benchmark._split_models("resnet50, cifar:model=resnext29_16x64d,dataset=cifar100") == [
        "resnet50",
        "cifar:model=resnext29_16x64d,dataset=cifar100",
    ]
    args = benchmark._parser().parse_args(["--batch=8", "--dtype=bfloat16", "--impl=dense"])
    sizes = {s: benchmark.resolve(s, args).input_shape
             for s in ("resnet50", "resnext29_8x64d", "fashion_mnist")}  # fmt: skip
    assert sizes == {"resnet50": (224, 224, 3), "resnext29_8x64d": (32, 32, 3),
                     "fashion_mnist": (28, 28, 1)}  # fmt: skip
    config = benchmark.resolve("cifar:model=resnext29_16x64d,dataset=cifar100", args).config
    assert (config.model.cardinality, config.model.num_classes) == (16, 100)
    model = config.model
    assert (model.dtype, model.conv_impl, config.batch_size) == ("bfloat16", "dense", 8)
    args.res = 64
    assert benchmark.resolve("fashion_mnist", args).input_shape == (64, 64, 1)


def test_rounds_and_ratios():
    assert benchmark.round_sizes(7, 3) == [3, 2, 2] and benchmark.round_sizes(1, 5) == [1]
    rows = [
        dict(model="a", framework="jax", images_per_sec=10.0),
        dict(model="a", framework="torch", images_per_sec=None),
        dict(model="b", framework="jax", images_per_sec=7.0),
        dict(model="b", framework="torch", images_per_sec=3.5),
        dict(model="b", framework="jax", images_per_sec=1.75),  # a second --impl
    ]
    benchmark.add_ratios(rows)
    assert [(r["vs_first"], r["vs_first_model"]) for r in rows] == [
        (1.0, "a"), (None, None), (0.7, "a"), (1.0, "b"), (0.175, "a")
    ]  # fmt: skip
    assert [r["jax_over_torch"] for r in rows] == [None, None, 2.0, 2.0, 0.5]


def test_a_worker_that_dies_fails_its_row_not_the_table(monkeypatch):
    class FakeWorker:
        def __init__(self, target, framework, args):
            self.target, self.framework, self.label = target, framework, target.name
            self.hello, self.info, self.times = {}, {}, []
            self.pending = None

        def request(self, **message):
            self.pending = message

        def reply(self):
            cmd = (self.pending or {}).get("cmd")
            if cmd == "run" and self.target.name == "resnext29_8x64d":
                raise benchmark.WorkerError(f"{self.label}: the worker exited (status -9)")
            return {"hello": {"device": "cpu", "version": {}}, "build": {}, "setup": {},
                    "run": {"seconds": 0.5}, "finish": {}}.get(cmd, {"device": "cpu",
                                                                 "version": {}})  # fmt: skip

        def call(self, **message):
            self.request(**message)
            return self.reply()

        def close(self):
            pass

    monkeypatch.setattr(benchmark, "Worker", FakeWorker)
    args = benchmark._parser().parse_args(["--batch=4", "--steps=2", "--rounds=2"])
    targets = [benchmark.resolve(name, args) for name in ("resnet18", "resnext29_8x64d")]
    rows = benchmark.measure(targets, ("jax",), args)
    assert rows[0]["images_per_sec"] == 8.0 and rows[0]["note"] == ""
    assert rows[1]["images_per_sec"] is None
    assert rows[1]["note"] == "failed: resnext29_8x64d: the worker exited (status -9)"


def test_several_impls_side_by_side_with_torch_once(capsys):
    rows = json.loads(_run(capsys, "--models=_tiny_resnext", "--impl=auto,xla_auto", "--torch",
                           "--torch-threads=1", "--res=32", "--format=json", *TINY))  # fmt: skip
    assert [(r["model"], r["framework"], r["impl"].split(" ")[0]) for r in rows] == [
        ("_tiny_resnext", "jax", "auto"), ("_tiny_resnext", "torch", ""),
        ("_tiny_resnext", "jax", "xla_auto"),
    ]  # fmt: skip
    assert rows[1]["note"].startswith("no torchvision model")
    assert "onednn" not in rows[2]["impl"] and rows[2]["vs_first"] > 0
    assert ("onednn" in rows[0]["impl"]) == grouped_conv.onednn_usable()


def test_an_unknown_impl_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--impl=auto,nope"])
    assert "--impl: unknown ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_devices_split_the_step_and_name_its_collectives(capsys):
    """--devices=1,2 (simulated on CPU) at --batch=8: each device computes the FLOPs of its
    own 8 images, as one device does, and the step all-reduces, nothing else."""
    out = _run(capsys, "--models=_tiny_resnext", "--res=16", "--format=json", "--devices=1,2",
               "--batch=8", "--impl=xla_auto", *TINY[1:])  # fmt: skip
    one, two = json.loads(out)
    assert (one["devices"], two["devices"], two["batch"]) == (1, 2, 8)
    assert two["images_per_sec_per_device"] == pytest.approx(two["images_per_sec"] / 2)
    assert two["images_per_sec"] == pytest.approx(16e3 / two["step_time_ms"])
    assert set(two["collectives"]) == {"all-reduce"}
    assert two["flops_per_device"] == pytest.approx(one["flops_per_device"], rel=0.05)


def test_devices_with_torch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--models=resnet18", "--torch", "--devices=1,2"])
    assert exit_info.value.code == 2
    assert "--torch times one device" in capsys.readouterr().err
