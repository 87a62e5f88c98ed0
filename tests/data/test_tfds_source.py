"""Image sources end to end: TFDS data sources (no TensorFlow), image folders, sharding, resume.

The TFDS datasets here are real array_record files, prepared by TFDS's own `imagenet2012`
and `cifar10` builders from images the tests encode (the builders' download step replaced),
so the reading path is the one a prepared ImageNet takes.
"""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from resnext_jax.data import base, image_source, sources
from resnext_jax.experiments import config_files
from resnext_jax.training import loop
from tests import fake_data
from tests.training.test_loop import tiny_config

cifar = config_files.config_module("cifar")
default = config_files.config_module("default")


def encode(array, fmt):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def labelled_image(label, shape, rng):
    """A uint8 image whose brightness is its label's, so that a tiny model can learn it."""
    level = 40 + 60 * (label % 3)
    return (level + rng.integers(0, 30, shape)).astype(np.uint8)


def prepare(name, data_dir, splits, monkeypatch):
    """Build TFDS dataset `name` as array_record from `splits`: {split: [feature dicts]}."""
    builder_cls = tfds.builder_cls(name)
    generators = lambda self, dl_manager: {s: enumerate(ex) for s, ex in splits.items()}  # noqa: E731
    monkeypatch.setattr(builder_cls, "_split_generators", generators)
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """`imagenet2012` with 40 train and 13 validation JPEGs of 4 classes, various sizes."""
    data_dir = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(0)

    def examples(n, prefix):
        for i in range(n):
            shape = (rng.integers(60, 120), rng.integers(60, 160), 3)
            label = int(rng.integers(0, 4))
            image = encode(labelled_image(label, shape, rng), "JPEG")
            yield {"image": image, "label": label, "file_name": f"{prefix}_{i}.JPEG"}

    splits = {"train": list(examples(40, "train")), "validation": list(examples(13, "val"))}
    with pytest.MonkeyPatch.context() as monkeypatch:
        prepare("imagenet2012", data_dir, splits, monkeypatch)
    return data_dir, splits


def imagenet_config(data_dir, **overrides):
    config = default.get_config()
    config.dataset.data_dir = str(data_dir)
    config.dataset.image_size = 48
    config.dataset.workers = 2
    for key, value in overrides.items():
        config.dataset[key] = value
    return config


def test_imagenet_reads_without_tensorflow(fake_imagenet):
    data_dir, splits = fake_imagenet
    source = sources.get_source(imagenet_config(data_dir))
    assert (source.num_train, source.num_eval, source.num_classes) == (40, 13, 1000)
    assert source.image_shape == (48, 48, 3) and source.preprocess.eval_resize == 55
    assert source.preprocess.augment == "random_resized_crop"
    record, label = source.train_records[0]
    assert isinstance(record, bytes) and record[:2] == b"\xff\xd8"  # still a JPEG
    batch = next(source.train_batches(8, seed=0))
    assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and np.isfinite(batch["image"]).all()
    evals = list(source.eval_batches(8))
    assert [int(b["mask"].sum()) for b in evals] == [8, 5]
    labels = np.concatenate([b["label"][b["mask"]] for b in evals])
    np.testing.assert_array_equal(
        np.sort(labels), np.sort([e["label"] for e in splits["validation"]])
    )
    again = list(source.eval_batches(8))
    for a, b in zip(evals, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert not a["image"][~a["mask"]].any()  # padding rows are zeros, not decoded
    assert "tensorflow" not in sys.modules


def test_missing_imagenet_says_where_the_archives_go(tmp_path):
    with pytest.raises(base.DataError) as error:
        sources.get_source(imagenet_config(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/downloads/manual/" in message and "ILSVRC2012_img_train.tar" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message
    config = imagenet_config(tmp_path)
    config.dataset.name = "no_such_dataset_here"
    with pytest.raises(base.DataError, match="unknown dataset 'no_such_dataset_here'"):
        sources.get_source(config)


def test_cifar10_config_reads_tfds_cifar10(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)

    def examples(n):
        for i in range(n):
            label = i % 10
            image = encode(labelled_image(label, (32, 32, 3), rng), "PNG")
            yield {"id": f"x_{i}", "image": image, "label": label}

    prepare("cifar10", tmp_path, {"train": list(examples(30)), "test": list(examples(12))},
            monkeypatch)  # fmt: skip
    config = cifar.get_config("model=resnext29_8x64d,dataset=cifar10")
    config.dataset.data_dir = str(tmp_path)
    source = sources.get_source(config)
    p = source.preprocess
    assert (p.augment, p.color_jitter, p.lighting, p.eval_resize) == ("pad_crop_flip", 0, 0, 32)
    assert p.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    batch = next(source.train_batches(10, seed=0))
    assert batch["image"].shape == (10, 32, 32, 3) and source.num_classes == 10
    assert next(source.eval_batches(12))["mask"].all()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """DIR/{train,val}/{a,...,f}/*.{jpg,png}: 36 train and 10 val images of various sizes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(2)
    for split, n in (("train", 36), ("val", 10)):
        for i in range(n):
            label = i % 6  # at least 5 classes: the trainer reports top-5 error
            folder = root / split / "abcdef"[label]
            folder.mkdir(parents=True, exist_ok=True)
            image = labelled_image(label, (rng.integers(30, 60), rng.integers(30, 60), 3), rng)
            PIL.Image.fromarray(image).save(folder / f"{i}.{'png' if i % 4 == 0 else 'jpg'}")
    return root


def test_image_folder_lists_classes_and_checks_splits(image_folder, tmp_path):
    source = fake_data.folder_source(image_folder)
    assert source.num_classes == 6 and source.train_records.classes == list("abcdef")
    assert (source.num_train, source.num_eval) == (36, 10)
    with pytest.raises(base.DataError, match="its subfolders: train, val"):
        fake_data.folder_source(image_folder, eval_split="validation")
    with pytest.raises(base.DataError, match="data_dir=DIR"):
        fake_data.folder_source("")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(base.DataError, match="the training split lacks: zebra"):
        fake_data.folder_source(tmp_path)
    (tmp_path / "val" / "zebra").rmdir()
    (tmp_path / "val" / "a").mkdir()
    (tmp_path / "val" / "a" / "ok.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    broken = fake_data.folder_source(tmp_path)
    with pytest.raises(base.DataError, match="broken.jpg"):
        next(broken.train_batches(1, seed=0))


class Counting:
    """Records that count the reads of each index."""

    def __init__(self, records):
        self.records, self.reads = records, []
        self.classes = records.classes

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.records[index]


def test_resumed_iterator_continues_and_reads_only_what_it_returns(image_folder):
    source = fake_data.folder_source(image_folder)
    fresh = source.train_batches(8, seed=5)  # 4 steps an epoch: step 6 is in the second
    batches = [next(fresh) for _ in range(8)]
    fresh.close()
    source.train_records = Counting(source.train_records)
    resumed = source.train_batches(8, seed=5, start_step=6)
    for step in (6, 7):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], batches[step]["image"])
        np.testing.assert_array_equal(batch["label"], batches[step]["label"])
    resumed.close()
    planned = {int(i) for s in range(6, 6 + 2 + image_source.BATCHES_AHEAD)
               for i in source.train_indices(8, 5, s)}  # fmt: skip
    assert set(source.train_records.reads) <= planned  # steps 0-5 were never read
    other_seed = next(source.train_batches(8, seed=6))
    assert not np.array_equal(other_seed["image"], batches[0]["image"])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_disjoint_shards_of_the_same_global_batches(image_folder, processes,
                                                                   monkeypatch):  # fmt: skip
    source = fake_data.folder_source(image_folder)
    whole = [next(source.train_batches(8, seed=1, start_step=s)) for s in range(5)]
    eval_whole = list(source.eval_batches(8))
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    per_process, eval_ids, seen = [], [], set()
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        per_process.append([next(source.train_batches(8, seed=1, start_step=s))
                            for s in range(5)])  # fmt: skip
        epoch = [source.train_indices(8, 1, s) for s in range(4)]
        eval_ids.append(np.concatenate(list(source.eval_indices(8))))
        assert not set(np.concatenate(epoch)) & seen
        seen |= set(np.concatenate(epoch))
        eval_local = list(source.eval_batches(8))
        for b, full in zip(eval_local, eval_whole, strict=True):
            rows = slice(index * 8 // processes, (index + 1) * 8 // processes)
            np.testing.assert_array_equal(b["image"], full["image"][rows])
    assert len(seen) == 32  # one epoch: 4 steps of 8 from 36 examples, no example twice
    for step in range(5):  # augmentation is keyed by the global row: same batch, split up
        joined = np.concatenate([p[step]["image"] for p in per_process])
        np.testing.assert_array_equal(joined, whole[step]["image"])
    ids = np.concatenate(eval_ids)
    assert sorted(ids[ids < source.num_eval]) == list(range(10))


EVAL_SCRIPT = """
import json, sys
import jax
from tests.training.test_loop import tiny_config
from resnext_jax.training import loop, steps
config = tiny_config(**json.loads(sys.argv[1]))
run, variables = loop.load_for_eval(config, workdir=sys.argv[2])
print(json.dumps(dict(steps.evaluate(run, variables), devices=jax.device_count())))
"""


def folder_overrides(root):
    return {"dataset.name": "image_folder", "dataset.data_dir": str(root),
            "dataset.eval_split": "val", "dataset.image_size": 16, "model.num_classes": 6,
            "dataset.workers": 2, "batch_size": 8, "eval_batch_size": 8}  # fmt: skip


@pytest.mark.slow
def test_image_folder_trains_and_evaluates_each_example_once_on_1_and_8_devices(
    image_folder, tmp_path
):
    """One training step here (1 device), then its checkpoint evaluated on 8 simulated ones."""
    config = tiny_config(**folder_overrides(image_folder), max_steps=1)
    results = loop.train_and_evaluate(config, tmp_path)
    assert results["steps"] == 1 and results["eval_examples"] == 10 and results["devices"] == 1
    assert results["dataset"] == "image_folder" and np.isfinite(results["eval_loss"])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    overrides = json.dumps({**folder_overrides(image_folder), "max_steps": 1})
    done = subprocess.run([sys.executable, "-c", EVAL_SCRIPT, overrides, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    eight = json.loads(done.stdout.strip().splitlines()[-1])
    assert eight["devices"] == 8 and eight["examples"] == 10
    assert eight["top1_error"] == results["top1_error"]
    assert eight["loss"] == pytest.approx(results["eval_loss"], rel=1e-5)
