"""Data sources: what the trainer reads batches from. None of them needs TensorFlow.

A source yields each process's share of every global batch as numpy arrays:

    train_batches(global_batch, seed, start_step) -> iterator of {"image", "label"}
    eval_batches(global_batch) -> iterator of {"image", "label", "mask"}

Training batches are a pure function of (seed, step), so a resumed run continues the
example order it had. Evaluation covers every example exactly once: the last batch is padded
and its padding masked out. Image sources (TFDS datasets, image folders) implement the same
interface in resnext_jax/image_pipeline.py and resnext_jax/tfds_pipeline.py.
"""

import gzip
import pathlib
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# Host-side train augmentations of in-memory sources.
AUGMENTATIONS = ("none", "flip", "pad_crop_flip")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what to do."""


class InMemorySource:
    """Uint8 NHWC images held in host memory, normalized per channel, augmented on the host."""

    def __init__(self, train, eval, num_classes, augment="none", mean=None, std=None):
        self.train_images, self.train_labels = train
        self.eval_images, self.eval_labels = eval
        self.num_classes = num_classes
        if augment not in AUGMENTATIONS:
            raise DataError(f"augment={augment!r}; choose one of {AUGMENTATIONS}")
        self.augment = augment
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

    def train_batches(self, global_batch, seed, start_step=0) -> Iterator[dict]:
        steps_per_epoch = self.num_train // global_batch
        if steps_per_epoch == 0:
            raise DataError(
                f"batch size {global_batch} is larger than the {self.num_train} training examples"
            )
        local = _local_slice(global_batch)
        step = start_step
        while True:
            epoch, index = divmod(step, steps_per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(self.num_train)
            # Sorted before the split, so that the global batch and its row order (and so its
            # BN groups) are the same on any number of processes.
            ids = np.sort(order[index * global_batch : (index + 1) * global_batch])[local]
            images = self.train_images[ids]
            rng = np.random.default_rng([seed, epoch, index])
            if self.augment == "pad_crop_flip":
                images = pad_crop_flip(images, rng, rows=local, batch=global_batch)
            elif self.augment == "flip":
                images = flip(images, rng, rows=local, batch=global_batch)
            yield {"image": self._normalize(images), "label": self.train_labels[ids]}
            step += 1

    def eval_batches(self, global_batch) -> Iterator[dict]:
        local = _local_slice(global_batch)
        for start in range(0, self.num_eval, global_batch):
            ids = np.arange(start, start + global_batch)[local]
            mask = ids < self.num_eval
            ids = np.where(mask, ids, 0)
            yield {
                "image": self._normalize(self.eval_images[ids]),
                "label": self.eval_labels[ids],
                "mask": mask,
            }


def _local_slice(global_batch) -> slice:
    """This process's rows of a global batch."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise DataError(f"batch size {global_batch} does not split over {count} processes")
    per_process = global_batch // count
    return slice(index * per_process, (index + 1) * per_process)


# The host-side augmentations below draw for a whole global batch of `batch` images and keep
# the draws of `rows`, the rows this process holds, so that each image's augmentation depends
# on its row of the global batch, not on how many processes share the batch.


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


def _find_idx(folder, stem):
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist(data_dir="", augment="pad_crop_flip") -> InMemorySource:
    """Fashion-MNIST from IDX files: `data_dir`, Debian's package, or a prepared TFDS copy."""
    folders = [pathlib.Path(data_dir)] if data_dir else [pathlib.Path(FASHION_MNIST_DIR)]
    for folder in folders:
        files = {split: [_find_idx(folder, s) for s in stems]
                 for split, stems in FASHION_MNIST_FILES.items()}  # fmt: skip
        if all(all(f) for f in files.values()):
            train, test = (
                (read_idx(images)[..., None], read_idx(labels).astype(np.int32))
                for images, labels in files.values()
            )
            return InMemorySource(train, test, num_classes=10, augment=augment)
    if not data_dir and (source := _fashion_mnist_from_tfds(augment)):
        return source
    stems = [s + "[.gz]" for pair in FASHION_MNIST_FILES.values() for s in pair]
    raise DataError(
        f"Fashion-MNIST not found in {folders[0]} (looked for {', '.join(stems)}). "
        "On Debian or Ubuntu: `sudo apt-get install dataset-fashion-mnist` (files land in "
        f"{FASHION_MNIST_DIR}); elsewhere download the four IDX files into a folder and pass "
        "--config.dataset.data_dir=FOLDER."
    )


def _fashion_mnist_from_tfds(augment):
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
    return InMemorySource(*arrays, num_classes=10, augment=augment)


def synthetic(image_size, channels, num_classes, num_train, num_eval, seed=0) -> InMemorySource:
    """Random images whose brightness depends on the label, so that a model can learn them."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.integers(0, 128, (n, image_size, image_size, channels))
        images = noise + (labels * 127 // max(num_classes - 1, 1))[:, None, None, None]
        return images.astype(np.uint8), labels

    return InMemorySource(split(num_train), split(num_eval), num_classes,
                          mean=[0.5] * channels, std=[0.25] * channels)  # fmt: skip


# Besides these, any TFDS dataset by name (resnext_jax/tfds_pipeline.py).
DATASETS = ("fashion_mnist", "synthetic", "image_folder")


def get_source(config):
    """The data source a training config asks for."""
    ds = config.dataset
    if ds.name == "fashion_mnist":
        source = fashion_mnist(ds.data_dir, ds.get("augment") or "pad_crop_flip")
        return source.subset(ds.num_train_examples, ds.num_eval_examples)
    if ds.name == "synthetic":
        return synthetic(
            ds.image_size,
            config.model.input_channels,
            config.model.num_classes,
            ds.num_train_examples or 1024,
            ds.num_eval_examples or 256,
            seed=config.seed,
        )
    # Imported here: they import this module, and TFDS takes a while to import.
    from resnext_jax import image_pipeline, tfds_pipeline

    if ds.name == "image_folder":
        preprocess = image_pipeline.make_preprocess(ds, channels=3)
        source = image_pipeline.image_folder(
            ds.data_dir, ds.train_split, ds.eval_split, preprocess, ds.workers
        )
    else:
        source = tfds_pipeline.tfds_source(config)
    return source.subset(ds.num_train_examples, ds.num_eval_examples)


def prefetch(iterator, size=2):
    """Run `iterator` in a background thread, `size` items ahead."""
    items = queue.Queue(maxsize=size)
    done = object()

    def work():
        try:
            for item in iterator:
                items.put(item)
        except Exception as e:  # surfaced in the consumer's thread
            items.put(e)
        items.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, Exception):
            raise item
        yield item
