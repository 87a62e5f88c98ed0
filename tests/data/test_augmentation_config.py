"""The config fields of RandAugment, random erasing and repeated augmentation reach every kind
of source, are checked when the source is built, and change training images only."""

import types

import ml_collections
import numpy as np
import pytest

from resnext_jax.data import base, preprocessing, randaugment, sources, tfds_source
from resnext_jax.experiments import config_files
from tests import fake_data

RECIPE = {"randaugment_n": 2, "randaugment_m": 7.0, "randaugment_mstd": 0.5,
          "random_erasing": 0.25, "repeated_augmentation": 2}  # fmt: skip
RA = randaugment.RandAugment(2, 7.0, 0.5)


def config(name, batch_size=8, **dataset):
    c = config_files.config_module("default").get_config()
    c.dataset.update({"name": name, "image_size": 8, "num_train_examples": 32,
                      "num_eval_examples": 8, **dataset})  # fmt: skip
    c.batch_size = batch_size
    c.model.input_channels = 3
    return c


def test_in_memory_sources_take_the_fields(tmp_path):
    fake_data.write_fake_fashion_mnist(tmp_path)
    for c in (
        config("synthetic", **RECIPE),
        config("fashion_mnist", data_dir=str(tmp_path), **RECIPE),
    ):
        source = sources.get_source(c)
        assert (source.rand_augment, source.erase_probability, source.repeats) == (RA, 0.25, 2)


def test_image_folder_and_tfds_sources_take_the_fields(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    for split in ("train", "val"):
        for label in "ab":
            fake_data.write_files(tmp_path / split / label,
                                  {f"{i}.png": fake_data.encode_image(pixels, "PNG")
                                   for i in range(4)})  # fmt: skip
    folder = fake_data.folder_source(tmp_path, **RECIPE)
    # A TFDS dataset without TFDS: the splits it would open, as records of uint8 arrays.
    records = [(pixels, i % 2) for i in range(16)]
    features = types.SimpleNamespace(shape=(32, 32, 3)), types.SimpleNamespace(num_classes=2)
    splits = {"train": records, "eval": records}
    monkeypatch.setattr(tfds_source, "open_splits", lambda *a, **k: (splits, *features))
    tfds = sources.get_source(config("cifar10", **RECIPE))
    for source in (folder, tfds):
        p = source.preprocess
        assert (p.rand_augment, p.erase_probability, source.repeats) == (RA, 0.25, 2)
    assert tfds.preprocess.augment == "pad_crop_flip"  # the rest of the CIFAR path as before


def test_configs_without_the_fields_train_as_before():
    c = config("synthetic")
    c.dataset = ml_collections.ConfigDict({k: v for k, v in c.dataset.items()
                                           if k not in RECIPE})  # fmt: skip
    source = sources.get_source(c)
    assert (source.rand_augment.n, source.erase_probability, source.repeats) == (0, 0.0, 1)
    default = sources.get_source(config("synthetic"))
    batches = [next(s.train_batches(8, seed=0, start_step=3))["image"] for s in (source, default)]
    np.testing.assert_array_equal(*batches)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("randaugment_n", -1, "config.dataset: randaugment_n=-1 must be an integer >= 0"),
        ("randaugment_m", 12.0, r"config.dataset: randaugment_m=12.0 must be in \[0, 10\]"),
        ("randaugment_mstd", -0.5, "config.dataset: randaugment_mstd=-0.5 must be >= 0"),
        ("random_erasing", 1.5, r"config.dataset: random_erasing=1.5 must be a probability"),
        ("repeated_augmentation", 0, "repeated_augmentation=0 must be an integer >= 1"),
        ("repeated_augmentation", 9, "repeated_augmentation=9 copies .* batch of 8"),
    ],
)
@pytest.mark.parametrize("name", ["synthetic", "image_folder"])
def test_bad_values_stop_the_source_naming_the_field(name, field, value, message):
    with pytest.raises(base.DataError, match=message):
        sources.get_source(config(name, **{field: value}))


def test_training_images_change_and_evaluation_images_do_not():
    plain, recipe = (sources.get_source(config("synthetic", **f)) for f in ({}, RECIPE))
    for a, b in zip(plain.eval_batches(8), recipe.eval_batches(8), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    a, b = (next(s.train_batches(8, seed=0))["image"] for s in (plain, recipe))
    assert a.shape == b.shape and a.dtype == b.dtype and not np.array_equal(a, b)
    p = preprocessing.Preprocess(image_size=8, rand_augment=RA, erase_probability=1.0)
    image = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    plain = preprocessing.Preprocess(image_size=8)
    np.testing.assert_array_equal(
        preprocessing.eval_image(image, p), preprocessing.eval_image(image, plain)
    )


def test_image_path_randaugments_before_the_color_chain_and_erases_after_normalizing():
    image = np.full((16, 16, 3), 200, np.uint8)
    kept = dict(image_size=16, augment="none", color_jitter=0, lighting=0, std=(0.01,) * 3)
    # Erasing alone: the normalized constant (200/255 - mean) / 0.01, about 35, except a box
    # of standard normal noise, whatever the normalization.
    erasing = preprocessing.Preprocess(**kept, erase_probability=1.0)
    out = preprocessing.train_image(image, np.random.default_rng(0), erasing)
    level = (200 / 255 - np.array(preprocessing.IMAGENET_MEAN)) / 0.01
    box = ~np.isclose(out, level, atol=1e-3).all(-1)
    assert 0.02 * 256 * 0.6 < box.sum() < 256 / 3 * 1.3
    assert np.abs(out[box]).max() < 6  # N(0, 1), not the pixel scale
    # RandAugment alone: on uint8 pixels before normalizing, so pixels stay in [0, 1].
    augmented = preprocessing.train_image(
        image, np.random.default_rng(0),
        preprocessing.Preprocess(**kept, rand_augment=randaugment.RandAugment(1)),
    )  # fmt: skip
    values = augmented * 0.01 + np.array(preprocessing.IMAGENET_MEAN)
    assert values.shape == (16, 16, 3) and values.min() >= -1e-3 and values.max() <= 1 + 1e-3
    outs = {preprocessing.train_image(image, np.random.default_rng(s),
                                      preprocessing.Preprocess(**kept, rand_augment=RA)).tobytes()
            for s in range(6)}  # fmt: skip
    assert len(outs) > 3  # each generator its own ops
