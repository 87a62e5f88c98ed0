"""What every data source shares: its error, the rows of each process, the epoch order.

A source (resnext_jax/data/in_memory.py, image_source.py, tfds_source.py; chosen by
resnext_jax/data/sources.py) yields each process's share of every global batch as numpy
arrays:

    train_batches(global_batch, seed, start_step) -> iterator of {"image", "label"}
    eval_batches(global_batch) -> iterator of {"image", "label", "mask"}

and has `num_train`, `num_eval`, `num_classes`, `image_shape` and `subset(num_train,
num_eval)`. Training batches are a pure function of (seed, step) (`batch_ids`), so a resumed
run continues the example order it had. Evaluation covers every example exactly once: the
last batch is padded and its padding masked out.
"""

import functools
import queue
import threading

import jax
import numpy as np


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what to do."""


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


def batch_ids(seed, step, num_examples, global_batch) -> np.ndarray:
    """The example ids of training step `step`'s global batch (0-based step), in epoch order."""
    epoch, index = divmod(step, steps_per_epoch(num_examples, global_batch))
    return epoch_permutation(seed, epoch, num_examples)[index * global_batch :][:global_batch]


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
