"""TFDS datasets read without TensorFlow: ImageNet, CIFAR, Imagenette, any image classifier.

A dataset prepared in the array_record format is read with `tfds.data_source`, which gives
random access by index with no TensorFlow (`import tensorflow_datasets` does not import it).
Images come back still encoded (`tfds.decode.SkipDecoding`), so a JPEG is decoded by PIL in
a worker thread, at reduced scale where the random crop allows (`preprocessing._draft`).
Preparing a dataset (`tfds build`) may need TensorFlow; training never does.
"""

import os

import numpy as np

from resnext_jax.data import image_source, preprocessing
from resnext_jax.data.base import DataError

TFDS_VERSION = "4.9.10"  # requirements.txt's pin, for the instructions below
# Image datasets of at most this many pixels a side (CIFAR, SVHN, MNIST) train with
# pad-and-crop by default; larger ones with the Inception crop.
SMALL_IMAGE = 64
DATASET_STATS = {
    "cifar10": (preprocessing.CIFAR10_MEAN, preprocessing.CIFAR10_STD),
    "cifar100": (preprocessing.CIFAR100_MEAN, preprocessing.CIFAR100_STD),
}


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_instructions(name, data_dir) -> str:
    """How to prepare dataset `name` in `data_dir`, for the error a missing dataset raises."""
    data_dir = data_dir or default_data_dir()
    build = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
    env = (
        "in an environment with TensorFlow, needed for preparing only (e.g. "
        f"`pip install tensorflow tensorflow-datasets=={TFDS_VERSION}`)"
    )
    base = name.split("/")[0].split(":")[0]
    if base == "imagenet2012":
        return (
            f"Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
            f"image-net.org, after registering) into {data_dir}/downloads/manual/, then, {env}, "
            f"run `{build}` (about 150 GB and a few hours; the archives can be deleted after)."
        )
    return f"Run `{build}` {env} on a machine with internet access, then copy {data_dir}/{base}."


def tfds_source(config, bad_examples="error", repeats=1) -> image_source.ImageSource:
    """The TFDS dataset `config.dataset.name` (a name, optionally `name/config:version`);
    `repeats`: repeated augmentation (resnext_jax/data/base.py, `batch_ids`)."""
    ds = config.dataset
    splits, image_feature, label_feature = open_splits(
        ds.name, ds.data_dir, {"train": ds.train_split, "eval": ds.eval_split},
        ds.image_key, ds.label_key,
    )  # fmt: skip
    channels = image_feature.shape[-1] or 3
    height, width = image_feature.shape[:2]
    small = height is not None and width is not None and max(height, width) <= SMALL_IMAGE
    base = ds.name.split("/")[0].split(":")[0]
    mean, std = DATASET_STATS.get(base, (None, None))
    preprocess = image_source.make_preprocess(
        ds, channels, "pad_crop_flip" if small else "random_resized_crop", mean, std
    )
    return image_source.ImageSource(splits["train"], splits["eval"], label_feature.num_classes,
                                    preprocess, ds.workers, bad_examples, repeats)  # fmt: skip


def open_splits(name, data_dir, splits, image_key="", label_key=""):
    """({role: Records} for `splits` ({role: split}), image feature, label feature) of TFDS
    dataset `name`, prepared in `data_dir` ("": TFDS's default) as array_record."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (0.5 s to import; only when used)

    builder = _prepared_builder(tfds, name, data_dir or None)
    info = builder.info
    image_key, label_key = _keys(info, image_key, label_key)
    image_feature = info.features[image_key]
    decoders = (
        {image_key: tfds.decode.SkipDecoding()}
        if isinstance(image_feature, tfds.features.Image)
        else None
    )
    records = {}
    for role, split in splits.items():
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False, decoders=decoders)  # fmt: skip
        except (ValueError, KeyError) as e:
            raise DataError(
                f"TFDS dataset {name} has no split {split!r} (its splits: "
                f"{', '.join(info.splits)}); set --config.dataset.{role}_split"
            ) from e
        records[role] = Records(source, image_key, label_key, f"TFDS {name} split {split!r}")
    return records, image_feature, info.features[label_key]


def _prepared_builder(tfds, name, data_dir):
    """TFDS's builder of `name`, checked to be prepared as array_record; else what to do."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown dataset {name!r}: not fashion_mnist, synthetic or image_folder, nor a "
            f"TFDS dataset ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from e
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name} is not prepared in {data_dir or default_data_dir()}. "
            + prepare_instructions(name, data_dir)
        )
    file_format = builder.info.file_format.value if builder.info.file_format else "unknown"
    if file_format != "array_record":
        raise DataError(
            f"TFDS dataset {name} in {builder.data_dir} is in the {file_format} format; "
            "reading it without TensorFlow needs array_record. Convert it (with TensorFlow "
            f"installed): `tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record`, or rebuild it with --file_format=array_record."
        )
    return builder


def _keys(info, image_key, label_key):
    """The image and label feature names: configured, else the supervised keys."""
    supervised = info.supervised_keys or ("image", "label")
    if len(supervised) == 2 and all(isinstance(k, str) for k in supervised):
        image_key, label_key = image_key or supervised[0], label_key or supervised[1]
    image_key, label_key = image_key or "image", label_key or "label"
    missing = [k for k in (image_key, label_key) if k not in info.features]
    if missing:
        raise DataError(
            f"{info.name} has no feature {', '.join(missing)} (its features: "
            f"{', '.join(info.features)}); set --config.dataset.image_key / label_key"
        )
    return image_key, label_key


class Records:
    """A TFDS data source as (image, label) pairs: encoded bytes or a uint8 array, an int."""

    def __init__(self, source, image_key, label_key, name=""):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.name = name  # for messages: "TFDS imagenet2012 split 'train'"

    def __len__(self):
        return len(self.source)

    def describe(self, index):
        return f"{self.name or 'TFDS'} example {index}"

    def __getitem__(self, index):
        record = self.source[index]
        image = record[self.image_key]
        return (image if isinstance(image, bytes) else np.asarray(image)), int(
            record[self.label_key]
        )
