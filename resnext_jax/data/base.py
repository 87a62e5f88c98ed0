"""What every data source shares: its errors, the rows of each process, the epoch order, what
a bad example does (`BadExamples`).

A source (resnext_jax/data/in_memory.py, image_source.py, tfds_source.py; chosen by
resnext_jax/data/sources.py) yields each process's share of every global batch as numpy
arrays:

    train_batches(global_batch, seed, start_step) -> iterator of {"image", "label", "skipped"}
    eval_batches(global_batch) -> iterator of {"image", "label", "mask", "skipped"}

and has `num_train`, `num_eval`, `num_classes`, `image_shape` and `subset(num_train,
num_eval)`. Training batches are a pure function of (seed, step) (`batch_ids`), so a resumed
run continues the example order it had. Evaluation covers every example exactly once: the
last batch is padded and its padding masked out.

"skipped" is a Python int, not an array: how many of this process's rows of the batch held a
bad example (`BadExamples`: unreadable, undecodable, label out of range) that was replaced by
the next good one (training) or masked out (evaluation). It is 0 when none was, and always
for in-memory sources, whose labels are checked when they load. The trainer pops it before
the batch goes to the devices and adds it up in its metrics.
"""

import functools
import logging
import queue
import threading

import jax
import numpy as np

# config.dataset.bad_examples: what a bad example does to a run.
BAD_EXAMPLE_POLICIES = ("error", "skip")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what to do."""


class BadExample(DataError):
    """One example that cannot be used: unreadable, undecodable, or its label out of range."""

    def __init__(self, where, reason):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def check_policy(policy) -> str:
    """`policy` if it is one of BAD_EXAMPLE_POLICIES; else an error that lists them."""
    if policy not in BAD_EXAMPLE_POLICIES:
        raise DataError(
            f"dataset.bad_examples={policy!r}; choose one of {BAD_EXAMPLE_POLICIES} (error: stop "
            "at the first bad example; skip: train on the next good one, leave it out of eval)"
        )
    return policy


class BadExamples:
    """`dataset.bad_examples` applied to the examples of per-example sources.

    Under "skip" a bad training example i is replaced by the first good one of i + 1, i + 2,
    ... (modulo the split size): a function of i and the data alone, so every other example
    keeps its place and a resumed run, any thread count and any batch see the same
    replacement. Each bad example is decoded (and logged) once; after that it is passed over.
    """

    def __init__(self, policy="error"):
        self.policy = check_policy(policy)
        self.found = {}  # (split, index) -> reason

    def handle(self, split, index, error: BadExample):
        """Under "error" raise, saying what to do; under "skip" remember the example."""
        if self.policy == "error":
            raise DataError(
                f"bad example {error}. Fix or delete it, or pass "
                "--config.dataset.bad_examples=skip to go on without it (scripts/check_dataset.py "
                "lists every bad example of a split)"
            ) from error
        if (split, index) not in self.found:
            self.found[split, index] = error.reason
            logging.getLogger(__name__).warning("skipping bad example %s", error)

    def load_or_none(self, split, index, load):
        """`load(index)`, or None if example `index` is bad (and the policy lets it pass)."""
        if (split, index) in self.found:
            return None
        try:
            return load(index)
        except BadExample as e:
            self.handle(split, index, e)
            return None

    def first_good(self, split, index, size, load):
        """(`load(i)`, whether i != index) for the first good i of index, index + 1, ... mod
        `size`."""
        for offset in range(size):
            result = self.load_or_none(split, (index + offset) % size, load)
            if result is not None:
                return result, offset > 0
        raise DataError(
            f"none of the {size} examples of the {split} split is usable; "
            "scripts/check_dataset.py lists what is wrong with each"
        )


def process_rows(global_batch) -> slice:
    """This process's rows of a global batch."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise DataError(f"batch size {global_batch} does not split over {count} processes")
    per_process = global_batch // count
    return slice(index * per_process, (index + 1) * per_process)


def steps_per_epoch(num_examples, global_batch) -> int:
    """Whole global batches per epoch (the remainder is left out of that epoch)."""
    if num_examples < global_batch:
        raise DataError(
            f"batch size {global_batch} is larger than the {num_examples} training examples"
        )
    return num_examples // global_batch


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, num_examples) -> np.ndarray:
    """The order of the training examples in `epoch` (read-only; cached, as every step of an
    epoch reads it)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def check_repeats(repeats, global_batch=None) -> int:
    """`repeats` (config.dataset.repeated_augmentation) if it is an integer >= 1, at most
    `global_batch`; else an error that says what to set."""
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise DataError(
            f"dataset.repeated_augmentation={repeats!r} must be an integer >= 1 (1: off; DeiT "
            "uses 3); set --config.dataset.repeated_augmentation=K"
        )
    if global_batch is not None and repeats > global_batch:
        raise DataError(
            f"dataset.repeated_augmentation={repeats} copies of an image do not fit in a batch "
            f"of {global_batch}; set it to at most batch_size"
        )
    return int(repeats)


def batch_ids(seed, step, num_examples, global_batch, repeats=1, sort=False) -> np.ndarray:
    """The example ids of training step `step`'s global batch (0-based step), in epoch order
    (with `sort`, the batch's distinct images in id order, each block of copies alike).

    Repeated augmentation (`repeats` k > 1, Hoffer et al. 2019; timm's RepeatAugSampler) takes
    ceil(global_batch / k) images and tiles them k times, cut to the batch (a batch that k does
    not divide, such as RSB's 2048 with k = 3, holds the last images one copy fewer): rows r,
    r + B/k, r + 2B/k, ... hold one image, each row augmented by its own draws. The copies lie
    B/k rows apart so that processes and devices, which take contiguous rows, hold different
    copies where they can, as timm deals the copies to different processes. An epoch keeps its
    num_examples // B steps (timm's too), so it sees num_examples / k distinct images; the
    images are drawn from a permutation per pass, and a pass over all of them takes k epochs.
    """
    distinct = -(-global_batch // check_repeats(repeats, global_batch))
    epoch, index = divmod(step, steps_per_epoch(num_examples, distinct))
    ids = epoch_permutation(seed, epoch, num_examples)[index * distinct :][:distinct]
    if sort:
        ids = np.sort(ids)
    return np.tile(ids, repeats)[:global_batch]


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
