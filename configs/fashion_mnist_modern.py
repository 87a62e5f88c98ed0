"""The offline default's network under modern-recipe tools, for a 20-minute budget on CPU.

    python scripts/train.py --config=configs/fashion_mnist_modern.py

The same ResNeXt-11 (4x16d) as configs/fashion_mnist.py, trained 3.2x as long, in bfloat16
(on CPUs with bfloat16 kernels; --config.model.dtype=float32 elsewhere), with pad-crop-flip
augmentation, RandAugment, random erasing, Mixup/CutMix, label smoothing, stochastic depth and
an EMA of the weights. It does not beat the default at this size: docs/results/fmnist_modern/
README.md has its runs.
"""

from resnext_jax.experiments import config_files

fashion_mnist = config_files.sibling(__file__, "fashion_mnist")


def get_config():
    config = fashion_mnist.get_config()
    config.model.dtype = "bfloat16"
    config.model.drop_path_rate = 0.05
    config.dataset.augment = "pad_crop_flip"
    config.dataset.randaugment_n = 1
    config.dataset.randaugment_m = 5.0
    config.dataset.random_erasing = 0.25
    config.num_epochs = 32
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 1.0
    config.mix_prob = 0.5
    config.ema_decay = 0.999
    config.eval_every_epochs = 4.0
    return config
