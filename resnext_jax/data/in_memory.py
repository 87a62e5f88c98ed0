"""Datasets held in host memory as uint8 arrays: Fashion-MNIST (IDX files) and synthetic data.

Normalized per channel and augmented on the host with numpy. A training batch is flipped or
cropped as a whole (`augment`), then each image takes RandAugment (resnext_jax/data/
randaugment.py) on uint8, is normalized, and takes random erasing (random_erasing.py), each
row drawing from its own generator (`row_generators`). None of it needs TensorFlow.
Labels are checked when they load (`check_labels`), so no batch holds a bad example and
every batch's "skipped" is 0.
"""

import gzip
import pathlib
from collections.abc import Iterator

import numpy as np

from resnext_jax.data import base, randaugment, random_erasing
from resnext_jax.data.base import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# The augmentations of in-memory training images (image files have their own:
# resnext_jax/data/preprocessing.py, IMAGE_ARRAY_AUGMENTATIONS).
ARRAY_AUGMENTATIONS = ("none", "flip", "pad_crop_flip")
NO_RAND_AUGMENT = randaugment.RandAugment()


class InMemorySource:
    """Uint8 NHWC images held in host memory, normalized per channel, augmented on the host."""

    def __init__(self, train, eval, num_classes, augment="none", mean=None, std=None,
                 rand_augment=NO_RAND_AUGMENT, erase_probability=0.0, repeats=1):  # fmt: skip
        self.train_images, self.train_labels = train
        self.eval_images, self.eval_labels = eval
        self.num_classes = num_classes
        if augment not in ARRAY_AUGMENTATIONS:
            raise DataError(f"augment={augment!r}; choose one of {ARRAY_AUGMENTATIONS}")
        self.augment = augment
        self.rand_augment = rand_augment
        try:
            self.erase_probability = random_erasing.check(erase_probability)
        except ValueError as e:
            raise DataError(f"config.dataset: {e}") from e
        self.repeats = base.check_repeats(repeats)
        pixels = self.train_images.reshape(-1, self.train_images.shape[-1])
        # Statistics of the training images themselves, unless the caller fixes them.
        self.mean = np.asarray(mean if mean is not None else pixels.mean(0) / 255, np.float32)
        self.std = np.asarray(std if std is not None else pixels.std(0) / 255, np.float32)

    def subset(self, num_train=0, num_eval=0):
        """The first `num_train` / `num_eval` examples (0: all), for quick runs."""
        self.train_images, self.train_labels = (
            a[: num_train or None] for a in (self.train_images, self.train_labels)
        )
        self.eval_images, self.eval_labels = (
            a[: num_eval or None] for a in (self.eval_images, self.eval_labels)
        )
        return self

    @property
    def image_shape(self):
        return self.train_images.shape[1:]

    @property
    def num_train(self):
        return len(self.train_labels)

    @property
    def num_eval(self):
        return len(self.eval_labels)

    def _normalize(self, images):
        return (images.astype(np.float32) / 255 - self.mean) / self.std

    def _augment_each(self, images, rngs):
        """RandAugment on uint8, normalization, random erasing: each image with its generator
        (bilinear resampling, the training mean as the fill)."""
        if self.rand_augment.n:
            fill = randaugment.fill_color(self.mean)
            images = np.stack([self.rand_augment(image, rng, fill)
                               for image, rng in zip(images, rngs, strict=True)])  # fmt: skip
        images = self._normalize(images)
        if self.erase_probability:
            for image, rng in zip(images, rngs, strict=True):
                random_erasing.erase(image, rng, self.erase_probability)
        return images

    def train_batches(self, global_batch, seed, start_step=0) -> Iterator[dict]:
        per_epoch = base.steps_per_epoch(self.num_train, global_batch)
        local = base.process_rows(global_batch)
        step = start_step
        while True:
            epoch, index = divmod(step, per_epoch)
            # Sorted before the split, so that the global batch and its row order (and so its
            # BN groups) are the same on any number of processes.
            ids = base.batch_ids(seed, step, self.num_train, global_batch, self.repeats,
                                 sort=True)[local]  # fmt: skip
            images = self.train_images[ids]
            key = [seed, epoch, index]
            rng = np.random.default_rng(key)
            if self.augment == "pad_crop_flip":
                images = pad_crop_flip(images, rng, rows=local, batch=global_batch)
            elif self.augment == "flip":
                images = flip(images, rng, rows=local, batch=global_batch)
            if self.rand_augment.n or self.erase_probability:
                images = self._augment_each(images, row_generators(key, local))
            else:
                images = self._normalize(images)
            yield {"image": images, "label": self.train_labels[ids], "skipped": 0}
            step += 1

    def eval_batches(self, global_batch) -> Iterator[dict]:
        local = base.process_rows(global_batch)
        for start in range(0, self.num_eval, global_batch):
            ids = np.arange(start, start + global_batch)[local]
            mask = ids < self.num_eval
            ids = np.where(mask, ids, 0)
            yield {
                "image": self._normalize(self.eval_images[ids]),
                "label": self.eval_labels[ids],
                "mask": mask,
                "skipped": 0,
            }


# The host-side augmentations below draw for a whole global batch of `batch` images and keep
# the draws of `rows`, the rows this process holds, so that each image's augmentation depends
# on its row of the global batch, not on how many processes share the batch.


def row_generators(key, rows) -> list[np.random.Generator]:
    """One generator per row of `rows` (a slice of the global batch): row r's is child r of
    the batch's seed sequence `key`, as `SeedSequence(key).spawn` makes it, so that it is the
    same whichever process holds the row."""
    return [np.random.default_rng(np.random.SeedSequence(key, spawn_key=(row,)))
            for row in range(rows.start, rows.stop)]  # fmt: skip


def flip(images, rng, rows=slice(None), batch=None):
    """Flip half of the images horizontally."""
    flipped = rng.random(batch or len(images))[rows] < 0.5
    return np.where(flipped[:, None, None, None], images[:, :, ::-1], images)


def pad_crop_flip(images, rng, pad=4, rows=slice(None), batch=None):
    """Zero-pad by `pad`, take a random crop of the original size, flip half horizontally."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, batch or n))[:, rows]
    flipped = rng.random(batch or n)[rows] < 0.5
    ys = dy[:, None] + np.arange(h)
    xs = dx[:, None] + np.arange(w)
    xs = np.where(flipped[:, None], xs[:, ::-1], xs)
    return padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]


def read_idx(path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    path = pathlib.Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise DataError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def check_labels(images, labels, num_classes, where):
    """Raise unless each image has one label in [0, num_classes): a label out of range would
    train silently on garbage (one-hot of nothing) or fail deep inside the loss."""
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{where}: example {first} has label {labels[first]}, outside the {num_classes} "
            f"classes (0 to {num_classes - 1}); {bad.size} label(s) in all. The file is "
            "corrupt or of another dataset: download (or prepare) it again"
        )


def _find_idx(folder, stem):
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist(data_dir="", augment="pad_crop_flip", **options) -> InMemorySource:
    """Fashion-MNIST from IDX files: `data_dir`, Debian's package, or a prepared TFDS copy.

    `options`: InMemorySource's rand_augment, erase_probability, repeats."""
    folders = [pathlib.Path(data_dir)] if data_dir else [pathlib.Path(FASHION_MNIST_DIR)]
    for folder in folders:
        files = {split: [_find_idx(folder, s) for s in stems]
                 for split, stems in FASHION_MNIST_FILES.items()}  # fmt: skip
        if all(all(f) for f in files.values()):
            train, test = (_read_split(*pair) for pair in files.values())
            return InMemorySource(train, test, num_classes=10, augment=augment, **options)
    if not data_dir and (source := _fashion_mnist_from_tfds(augment, **options)):
        return source
    stems = [s + "[.gz]" for pair in FASHION_MNIST_FILES.values() for s in pair]
    raise DataError(
        f"Fashion-MNIST not found in {folders[0]} (looked for {', '.join(stems)}). "
        "On Debian or Ubuntu: `sudo apt-get install dataset-fashion-mnist` (files land in "
        f"{FASHION_MNIST_DIR}); elsewhere download the four IDX files into a folder and pass "
        "--config.dataset.data_dir=FOLDER."
    )


def _read_split(images_file, labels_file):
    """(images NHWC, labels) of a Fashion-MNIST split, its labels checked."""
    images, labels = read_idx(images_file)[..., None], read_idx(labels_file).astype(np.int32)
    check_labels(images, labels, 10, labels_file)
    return images, labels


def _fashion_mnist_from_tfds(augment, **options):
    """TFDS's prepared `fashion_mnist`, read through its TensorFlow-free data source."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    try:
        splits = [
            tfds.data_source("fashion_mnist", split=s, download=False) for s in ("train", "test")
        ]
    except Exception:  # not prepared, or prepared in a format data sources cannot read
        return None
    arrays = [
        (np.stack([r["image"] for r in ds]), np.array([r["label"] for r in ds], np.int32))
        for ds in splits
    ]
    for (images, labels), split in zip(arrays, ("train", "test"), strict=True):
        check_labels(images, labels, 10, f"TFDS fashion_mnist split {split!r}")
    return InMemorySource(*arrays, num_classes=10, augment=augment, **options)


def synthetic(image_size, channels, num_classes, num_train, num_eval, seed=0, **options
              ) -> InMemorySource:  # fmt: skip
    """Random images whose brightness depends on the label, so that a model can learn them
    (`options`: InMemorySource's rand_augment, erase_probability, repeats)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.integers(0, 128, (n, image_size, image_size, channels))
        images = noise + (labels * 127 // max(num_classes - 1, 1))[:, None, None, None]
        return images.astype(np.uint8), labels

    return InMemorySource(split(num_train), split(num_eval), num_classes,
                          mean=[0.5] * channels, std=[0.25] * channels, **options)  # fmt: skip
