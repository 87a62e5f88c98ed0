"""The dispatcher: the data source a training config asks for (`get_source`).

The sources themselves: resnext_jax/data/in_memory.py (Fashion-MNIST, synthetic),
image_source.py (folders of image files), tfds_source.py (any TFDS image dataset); what
they share, resnext_jax/data/base.py.
"""

from resnext_jax.data import base, image_source, in_memory, randaugment, tfds_source

# Besides these, any TFDS dataset by name (resnext_jax/data/tfds_source.py).
DATASETS = ("fashion_mnist", "synthetic", "image_folder")


def get_source(config):
    """The data source a training config asks for."""
    ds = config.dataset
    # Checked for every source, though only image sources have examples to skip, so that a
    # misspelled policy never passes silently.
    bad_examples = base.check_policy(ds.get("bad_examples", "error"))
    # Repeated augmentation for every source; RandAugment and random erasing go into the
    # in-memory sources here and into image sources' Preprocess (image_source.make_preprocess).
    repeats = base.check_repeats(ds.get("repeated_augmentation", 1), config.batch_size)
    in_memory_options = {
        "rand_augment": randaugment.from_config(ds),
        "erase_probability": ds.get("random_erasing", 0.0),
        "repeats": repeats,
    }
    if ds.name == "fashion_mnist":
        source = in_memory.fashion_mnist(
            ds.data_dir, ds.get("augment") or "pad_crop_flip", **in_memory_options
        )
        return source.subset(ds.num_train_examples, ds.num_eval_examples)
    if ds.name == "synthetic":
        return in_memory.synthetic(
            ds.image_size,
            config.model.input_channels,
            config.model.num_classes,
            ds.num_train_examples or 1024,
            ds.num_eval_examples or 256,
            seed=config.seed,
            **in_memory_options,
        )
    if ds.name == "image_folder":
        preprocess = image_source.make_preprocess(ds, channels=3)
        source = image_source.image_folder(
            ds.data_dir, ds.train_split, ds.eval_split, preprocess, ds.workers, bad_examples,
            repeats,
        )  # fmt: skip
    else:
        source = tfds_source.tfds_source(config, bad_examples, repeats)
    return source.subset(ds.num_train_examples, ds.num_eval_examples)
