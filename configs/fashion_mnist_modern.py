"""Fashion-MNIST in 20 minutes of a 2-core CPU under modern-recipe tools, and their ablation.

    python scripts/train.py --config=configs/fashion_mnist_modern.py
    python scripts/train.py --config=configs/fashion_mnist_modern.py:change=lamb  # lowest error
    python scripts/sweep.py --config=configs/fashion_mnist_modern.py --seeds=3 --run  # ablation
    python scripts/report.py workdirs/sweeps/fashion_mnist_modern

The offline default's ResNeXt-11 (4x16d) at ImageNet's width (a 64-channel stem and 64
first-stage planes instead of 32), in bfloat16 (on CPUs with bfloat16 kernels;
--config.model.dtype=float32 elsewhere), for `EPOCHS` epochs with flips, random erasing, label
smoothing and an EMA of the weights, and evaluated with test-time flips. The EMA's error is
reported beside the raw weights', so it needs no run of its own; test-time flips change no
weight, so `scripts/eval.py --config.eval_flip=False` scores a run without them. The sweep
changes one thing at a time (`change=`, `CHANGES`): a tool of the recipe taken out, a tool of
the modern toolbox put in, or the default's narrower network. What each did, over which seeds,
on which machine: docs/results/fmnist_modern/README.md.
"""

import functools

from resnext_jax.experiments import config_files

fashion_mnist = config_files.sibling(__file__, "fashion_mnist")

EPOCHS = 20  # sized to 20 minutes of a 2-core CPU (docs/results/fmnist_modern/README.md)


def _no_erasing(config):
    config.dataset.random_erasing = 0.0


def _no_smoothing(config):
    config.label_smoothing = 0.0


def _crop(config):
    config.dataset.augment = "pad_crop_flip"


def _mixup(config):
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 1.0
    config.mix_prob = 0.5


def _randaugment(config):
    config.dataset.randaugment_n = 1
    config.dataset.randaugment_m = 5.0


def _drop_path(config):
    config.model.drop_path_rate = 0.05


def _optimizer(config, name, learning_rate, weight_decay):
    config.optimizer = name
    config.learning_rate = learning_rate
    config.weight_decay = weight_decay
    config.weight_decay_on = "kernels"
    config.warmup_epochs = 1.0


def _bce(config):
    config.loss = "bce"
    config.bce_target_threshold = 0.2


def _repeated(config):
    config.dataset.repeated_augmentation = 3


def _narrow(config):
    config.model.stem_width = 32
    config.model.planes = 32


# One change to the recipe per setting of the sweep.
CHANGES = {
    "none": lambda config: None,
    "no_erasing": _no_erasing,
    "no_smoothing": _no_smoothing,
    "crop": _crop,  # zero-pad 4 and a random 28x28 crop, before the flip
    "mixup": _mixup,  # Mixup 0.2 or CutMix 1.0 on half of the batches
    "randaugment": _randaugment,  # one op at magnitude 5 per image
    "drop_path": _drop_path,
    "narrow": _narrow,  # the offline default's network: 32 stem channels and first-stage planes
    # The optimizers and loss of timm's A1-A3 at this batch (128, lr per 128 images), with one
    # epoch of warmup and no decay on BN and biases; repeated augmentation as A1 and A2.
    "adamw": functools.partial(_optimizer, name="adamw", learning_rate=1e-3, weight_decay=0.05),
    "lamb": functools.partial(_optimizer, name="lamb", learning_rate=5e-3, weight_decay=0.02),
    "bce": _bce,  # binary cross-entropy, targets above 0.2 count as 1
    "repeated": _repeated,  # each image 3 times per batch, differently augmented
}


def get_config(arg="change=none"):
    args = config_files.parse_family_args(
        arg, allowed={"change": tuple(CHANGES)}, defaults={"change": "none"}
    )
    config = fashion_mnist.get_config()
    config.model.stem_width = 64
    config.model.planes = 64
    config.model.dtype = "bfloat16"
    config.dataset.augment = "flip"
    config.dataset.random_erasing = 0.25
    config.label_smoothing = 0.1
    config.ema_decay = 0.999
    config.eval_flip = True
    config.num_epochs = EPOCHS
    config.eval_every_epochs = 4.0
    CHANGES[args["change"]](config)
    return config


def get_sweep():
    """The recipe, then each change to it."""
    return [f"change={name}" for name in CHANGES]
