"""The offline default: a small ResNeXt (CIFAR-style stem, 3 stages) on Fashion-MNIST.

    python scripts/train.py --config=configs/fashion_mnist.py

Reads the IDX files of Debian's `dataset-fashion-mnist` package, so it runs with no
internet. The model keeps the paper's block (1x1, grouped 3x3 with C=4, 1x1) at a size
that trains on a 2-core CPU in minutes.
"""

from resnext_jax.experiments import config_files
from resnext_jax.models import variants

default = config_files.sibling(__file__, "default")


def get_config():
    config = default.get_config()
    # ResNeXt-11 (4x16d): a 3x3 stride-2 stem to 14x14, then 3 stages of one bottleneck
    # (14x14, 7x7, 4x4) with 128/256/512 output channels and C=4 groups of 8 channels.
    config.model = variants.model_config(
        "resnext11_4x16d",
        stem_strides=2,
        stem_width=32,
        planes=32,
        num_classes=10,
        input_channels=1,
    )
    config.dataset.name = "fashion_mnist"
    config.dataset.eval_split = "test"
    config.dataset.image_size = 28
    # Flips only, and light weight decay: at a few epochs this small network underfits, so the
    # regularizers of long schedules cost more than they save (docs/benchmarks.md, "The
    # Fashion-MNIST default", has the runs behind the recipe and its test error).
    config.dataset.augment = "flip"  # one of in_memory.ARRAY_AUGMENTATIONS
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 10
    config.learning_rate = 0.1
    config.lr_batch_size = 128
    config.weight_decay = 5e-5
    config.lr_schedule = "cosine"
    config.warmup_epochs = 0.0
    config.checkpoint_every_steps = 500
    config.log_every_steps = 50
    return config
