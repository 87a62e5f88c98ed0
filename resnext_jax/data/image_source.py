"""Image data sources read by index: TFDS data sources and folders of image files.

`ImageSource` turns random-access records (`records[i] -> (image, label)`, the image as
encoded bytes, a file path or a uint8 array) into the trainer's batches. Decoding and
augmentation run in a pool of threads (PIL and numpy release the GIL for the heavy parts),
a few batches ahead of the trainer.

Order (resnext_jax/data/base.py). Epoch e is a permutation of the training indices drawn from
(seed, e); step s reads
rows [i * B, (i + 1) * B) of it (s = e * steps_per_epoch + i, B the global batch) and each
process decodes only its own rows, so the processes read disjoint examples and none reads
another's. A resumed iterator (start_step) computes its first batch directly, reading
nothing it skips. Each image's augmentation draws from (seed, step, row of the global
batch): the same global batch on any number of processes, threads or devices.

Bad examples (`load_example`: unreadable, undecodable, too thin, label out of range) stop
the run or, with `dataset.bad_examples=skip`, are replaced in training by the next good
example and masked out of evaluation (resnext_jax/data/base.py, `BadExamples`).
"""

import collections
import concurrent.futures
import functools
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from resnext_jax.data import base, preprocessing, randaugment
from resnext_jax.data.base import BadExample, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BATCHES_AHEAD = 2  # batches decoded ahead of the one being consumed


class ImageSource:
    """Batches of decoded, augmented images from random-access train and eval records."""

    def __init__(self, train, eval, num_classes, preprocess: preprocessing.Preprocess, workers=0,
                 bad_examples="error", repeats=1):  # fmt: skip
        self.train_records, self.eval_records = train, eval
        self.num_classes = num_classes
        self.preprocess = preprocess
        self.repeats = base.check_repeats(repeats)  # repeated augmentation (base.batch_ids)
        self.bad = base.BadExamples(bad_examples)
        self.workers = workers or len(os.sched_getaffinity(0))
        self._num_train, self._num_eval = len(train), len(eval)
        self._pool = None

    def subset(self, num_train=0, num_eval=0):
        """Only the first `num_train` / `num_eval` examples (0: all), for quick runs."""
        self._num_train = min(num_train or self._num_train, len(self.train_records))
        self._num_eval = min(num_eval or self._num_eval, len(self.eval_records))
        return self

    @property
    def num_train(self):
        return self._num_train

    @property
    def num_eval(self):
        return self._num_eval

    @property
    def image_shape(self):
        p = self.preprocess
        return (p.image_size, p.image_size, p.channels)

    @property
    def eval_image_shape(self):
        p = self.preprocess
        return (p.eval_image_size, p.eval_image_size, p.channels)

    def train_indices(self, global_batch, seed, step) -> np.ndarray:
        """This process's example indices for training step `step` (0-based)."""
        ids = base.batch_ids(seed, step, self.num_train, global_batch, self.repeats)
        return ids[base.process_rows(global_batch)]

    def eval_indices(self, global_batch) -> Iterator[np.ndarray]:
        """This process's eval indices, batch by batch; past the end (padding) is >= num_eval."""
        local = base.process_rows(global_batch)
        for start in range(0, self.num_eval, global_batch):
            yield np.arange(start, start + global_batch)[local]

    def train_batches(self, global_batch, seed, start_step=0) -> Iterator[dict]:
        local = base.process_rows(global_batch)

        def plan(step):
            ids = self.train_indices(global_batch, seed, step)
            return ids, [(seed, step, row) for row in range(local.start, local.start + len(ids))]

        def plans():
            step = start_step
            while True:
                yield plan(step)
                step += 1

        return self._batches(plans(), self.train_records, self.image_shape, train=True)

    def eval_batches(self, global_batch) -> Iterator[dict]:
        plans = ((ids, [None] * len(ids)) for ids in self.eval_indices(global_batch))
        return self._batches(plans, self.eval_records, self.eval_image_shape, train=False)

    def _batches(self, plans, records, shape, train) -> Iterator[dict]:
        """Decode the planned batches in the pool, BATCHES_AHEAD batches in advance.

        A plan is (example ids, augmentation seeds: one per row, None for evaluation).
        """
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="decode"
            )
        pending = collections.deque()
        limit = self.num_train if train else self.num_eval

        def submit(ids, keys):
            batch = {"image": np.zeros((len(ids), *shape), np.float32),
                     "label": np.zeros(len(ids), np.int32), "mask": ids < limit}  # fmt: skip
            jobs = [self._pool.submit(self._decode, records, int(i), keys[r], batch, r)
                    for r, i in enumerate(ids) if batch["mask"][r]]  # fmt: skip
            if train:
                del batch["mask"]
            pending.append((batch, jobs))

        try:
            for ids, rngs in plans:
                submit(ids, rngs)
                if len(pending) > BATCHES_AHEAD:
                    yield _collect_batch(*pending.popleft())
            while pending:
                yield _collect_batch(*pending.popleft())
        finally:  # a closed iterator drops its queued work and waits for the running part
            jobs = [job for _, batch_jobs in pending for job in batch_jobs]
            for job in jobs:
                job.cancel()
            concurrent.futures.wait(jobs)

    def _decode(self, records, index, key, batch, row) -> int:
        """Example `index` into row `row` of `batch`; 1 if it was bad (so replaced by the next
        good one when training, masked out when evaluating), else 0."""
        out = batch["image"][row]

        def load(i):
            p = self.preprocess
            if key is None:
                decode = functools.partial(preprocessing.eval_image, p=p, out=out)
            else:  # a new generator per try: a replacement draws what the bad one would have
                rng = np.random.default_rng(key)
                decode = functools.partial(preprocessing.train_image, rng=rng, p=p, out=out)
            return load_example(records, i, self.num_classes, decode)

        if key is not None:
            label, replaced = self.bad.first_good("train", index, self.num_train, load)
        else:
            label = self.bad.load_or_none("eval", index, load)
            replaced = label is None
            if replaced:
                out[...], batch["mask"][row], label = 0, False, 0
        batch["label"][row] = label
        return int(replaced)


def _collect_batch(batch, jobs):
    batch["skipped"] = sum(job.result() for job in jobs)  # re-raises a worker's error here
    return batch


def describe(records, index) -> str:
    """Where example `index` of `records` comes from, for messages: a path, a TFDS split."""
    describe_one = getattr(records, "describe", None)
    return describe_one(index) if describe_one else f"example {index}"


def load_example(records, index, num_classes, decode) -> int:
    """The label of example `index`, after `decode(image)`; BadExample if it cannot be read,
    `decode` raises, or the label is outside [0, num_classes).

    What training rejects, scripts/check_dataset.py reports: both come through here.
    """
    try:
        item, label = records[index]
    except Exception as e:  # a corrupt record of a TFDS file, a file gone since listing
        raise BadExample(describe(records, index), f"unreadable ({type(e).__name__}: {e})") from e
    if not 0 <= label < num_classes:
        raise BadExample(
            describe(records, index),
            f"label {label} is outside the {num_classes} classes (0 to {num_classes - 1})",
        )
    try:
        decode(item)
    except Exception as e:  # PIL's errors for broken files have no common base class
        raise BadExample(describe(records, index), f"{type(e).__name__}: {e}") from e
    return int(label)


class FolderRecords(Sequence):
    """Image files in one subfolder per class: `root/CLASS/**/*.jpg` (or .png, ...), through
    symbolic links too."""

    def __init__(self, root, classes=None):
        root = pathlib.Path(root)
        found = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        self.classes = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise DataError(
                f"{root} has class folders that the training split lacks: {', '.join(unknown)}"
            )
        self.paths, labels = [], []
        for name in found:
            files = image_files(root / name)
            self.paths += files
            labels += [index[name]] * len(files)
        self.labels = np.asarray(labels, np.int32)
        if not self.paths:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of {root}"
            )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index], self.labels[index]

    def describe(self, index):
        return str(self.paths[index])


def image_files(folder) -> list[pathlib.Path]:
    """The files with an image extension under `folder`, sorted, following symbolic links.

    Each real folder is read once, so a link to a folder's own ancestor ends the descent
    instead of looping. A link to a missing file is listed, so that it fails loudly.
    """
    files, seen = [], set()
    for path, folders, names in os.walk(folder, followlinks=True):
        stat = os.stat(path)
        if (stat.st_dev, stat.st_ino) in seen:
            folders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        files += [pathlib.Path(path, n) for n in names
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]  # fmt: skip
    return sorted(files)


def image_folder(data_dir, train_split, eval_split, preprocess, workers=0, bad_examples="error",
                 repeats=1) -> ImageSource:  # fmt: skip
    """Folders of images, `data_dir/<split>/<class>/<image>`, classes named by the train split."""
    root = pathlib.Path(data_dir or ".")
    missing = [s for s in (train_split, eval_split) if not (data_dir and (root / s).is_dir())]
    if missing:
        have = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise DataError(
            "image_folder needs --config.dataset.data_dir=DIR with a subfolder per split and in "
            f"it one per class (DIR/{train_split}/CLASS/IMAGE.jpg); data_dir={data_dir!r} has no "
            f"{', '.join(missing)} (its subfolders: {', '.join(have) or 'none'}; "
            "--config.dataset.train_split and eval_split name them)"
        )
    train = FolderRecords(root / train_split)
    eval = FolderRecords(root / eval_split, classes=train.classes)
    return ImageSource(train, eval, len(train.classes), preprocess, workers, bad_examples, repeats)


def make_preprocess(ds, channels, augment="random_resized_crop", mean=None, std=None):
    """A Preprocess from a `config.dataset` block; empty fields take the dataset's defaults."""
    if mean is None:
        mean, std = (
            (preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)
            if channels == 3
            else ((0.5,) * channels, (0.5,) * channels)  # [0, 1] to [-1, 1]
        )
    try:
        return preprocessing.Preprocess(
            image_size=ds.image_size,
            channels=channels,
            augment=ds.augment or augment,
            crop_area_range=tuple(ds.crop_area_range),
            crop_aspect_range=tuple(ds.crop_aspect_range),
            flip=ds.flip,
            crop_padding=ds.crop_padding,
            color_jitter=ds.color_jitter,
            lighting=ds.lighting,
            mean=tuple(ds.mean) or tuple(mean),
            std=tuple(ds.std) or tuple(std),
            interpolation=ds.interpolation,
            eval_image_size=ds.eval_image_size or ds.image_size,
            eval_crop_fraction=ds.eval_crop_fraction,
            jpeg_draft=ds.jpeg_draft,
            rand_augment=randaugment.from_config(ds),
            erase_probability=ds.get("random_erasing", 0.0),
        )
    except ValueError as e:
        raise DataError(f"config.dataset: {e}") from e
